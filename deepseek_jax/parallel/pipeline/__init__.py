"""Pipeline parallelism over the `pipe` mesh axis.

Runtime (what the jitted step runs): `schedules` (per-rank op orders of DualPipe, DualPipeV,
1F1B, GPipe) -> `ticks` (the lock-step tick table) -> `executor` (the table run inside one
shard_map of ppermutes) with `ops` (the F/B/Bi/W/F&B branches) on `stages` (the model cut into
stages: slices of `Transformer`'s own prologue/stack/epilogue, and the objective per micro-batch).
Analysis (bench/, `python -m deepseek_jax.schedule`, tests): `ticksim` (replays a table with
tagged payloads), `costmodel` (step time and bubbles from per-op costs), `report` (tables).
The pipelined train step that drives the executor is train/pipeline_step.py.
"""
