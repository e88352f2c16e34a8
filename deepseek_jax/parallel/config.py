"""Typed parallelism settings (the `parallel` section of an experiment config).

Mesh axis sizes, the logical-axis rules preset and the expert-parallel exchange. The sharding layer
(parallel/mesh.py, sharding.py, plan.py) interprets them; -1 for `data` means "whatever the device
count leaves". What is checked here needs nothing else; which axes a preset may use and every check
that needs the device count live in validate.py (run by plan.make_plan).
`pipeline` selects a pipeline schedule over the `pipe` axis (`--config.parallel.pipeline=dualpipe`,
docs/pipeline_execution.md); `microbatches` is the total per step (DualPipe's num_chunks: half
enter at each end). `check_pipeline` checks a pipeline against the model and train sections.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Preset(enum.Enum):
    """Named logical->mesh rules (the table is parallel/sharding.py's RULES; docs/parallelism.md).

    DATA: pure data parallel, every parameter replicated.
    FSDP: parameters and optimizer state sharded over `fsdp` (ZeRO-3); `data` replicates (HSDP).
    FSDP_TP: FSDP plus Megatron tensor parallelism over `tensor` (heads, FFN, vocab).
    DATA_EXPERT: data parallel dense layers, routed experts sharded over `expert` (all-to-all).
    FSDP_EXPERT_TP: experts over `expert`; dense weights FSDP-sharded over `fsdp` x `expert`;
        heads, FFN and vocab over `tensor`.
    """

    DATA = "data"
    FSDP = "fsdp"
    FSDP_TP = "fsdp_tp"
    DATA_EXPERT = "data_expert"
    FSDP_EXPERT_TP = "fsdp_expert_tp"


class ExpertExchange(enum.Enum):
    """How routed tokens travel between expert-parallel ranks (parallel/expert.py).

    ALL_TO_ALL: one dense all_to_all of a worst-case-sized buffer per direction; dropless and
        runs on every backend (the only one XLA:CPU can execute).
    RAGGED_ALL_TO_ALL: jax.lax.ragged_all_to_all sends exactly the routed rows (TPU, GPU); the
        same code as ALL_TO_ALL apart from the two exchange calls.
    """

    ALL_TO_ALL = "all_to_all"
    RAGGED_ALL_TO_ALL = "ragged_all_to_all"


class Schedule(enum.Enum):
    """The pipeline schedule over the `pipe` axis, or NONE (no pipeline); the one schedule enum
    (parallel/pipeline/schedules.py builds each schedule's per-rank op orders)."""

    NONE = "none"
    DUALPIPE = "dualpipe"
    DUALPIPEV = "dualpipev"
    ONE_F_ONE_B = "1f1b"
    GPIPE = "gpipe"


class BackwardSplit(enum.Enum):
    """How the zero-bubble Bi/W ops of a pipeline schedule split a stage's backward
    (docs/pipeline_execution.md, "B / Bi / W").

    EXACT: Bi recomputes the stage forward from its stored input and runs the input-gradient
    chain, storing the residuals the weight gradients need (each weight GEMM's input and output
    cotangent); W runs only the weight GEMMs from them. Bi + W costs one full B.
    RECOMPUTE: nothing is stored between Bi and W but the stage input and its output gradient;
    W recomputes the forward and the input-gradient chain (Bi + W costs ~5/3 of a B). The
    memory-saving mode: no residual buffers.
    """

    EXACT = "exact"
    RECOMPUTE = "recompute"


AXIS_FIELDS = ("pipe", "data", "fsdp", "expert", "tensor")
# Presets verified with a pipeline (tests/parallel/test_pipeline_step.py): parameters replicated
# or experts over `expert`. Sharding weights over fsdp/tensor inside a stage is not composed yet.
PIPELINE_PRESETS = (Preset.DATA, Preset.DATA_EXPERT)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    pipe: int = 1  # pipeline ranks (the `pipe` mesh axis); > 1 needs `pipeline`
    preset: Preset = Preset.DATA
    expert_exchange: ExpertExchange = ExpertExchange.ALL_TO_ALL
    pipeline: Schedule = Schedule.NONE
    microbatches: int = 0  # per step; 0: 2 * pipe, the least DualPipe accepts
    backward_split: BackwardSplit = BackwardSplit.EXACT  # Bi/W: stored residuals or recompute
    zero: int = 0  # 1: ZeRO-1, optimizer state split over `data` (parallel/sharding.zero1_specs)

    def __post_init__(self):
        for name in AXIS_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"parallel.{name}: expected an int, got {value!r}")
            if value <= 0 and not (name == "data" and value == -1):
                allowed = "a positive int or -1 (fill)" if name == "data" else "a positive int"
                raise ValueError(f"parallel.{name}: must be {allowed}, got {value}")
        if not isinstance(self.preset, Preset):
            raise ValueError(
                f"parallel.preset: unknown preset {self.preset!r} (allowed: "
                f"{[p.value for p in Preset]})"
            )
        if not isinstance(self.expert_exchange, ExpertExchange):
            raise ValueError(
                f"parallel.expert_exchange: unknown value {self.expert_exchange!r} "
                f"(allowed: {[e.value for e in ExpertExchange]})"
            )
        if not isinstance(self.backward_split, BackwardSplit):
            raise ValueError(
                f"parallel.backward_split: unknown value {self.backward_split!r} "
                f"(allowed: {[b.value for b in BackwardSplit]})"
            )
        if self.zero not in (0, 1) or isinstance(self.zero, bool):
            raise ValueError(
                f"parallel.zero: must be 0 (replicated optimizer state) or 1 "
                f"(ZeRO-1, split over data), got {self.zero!r}"
            )
        if self.microbatches < 0:
            raise ValueError(f"parallel.microbatches must be >= 0, got {self.microbatches}")
        if self.pipeline is not Schedule.NONE and self.pipe < 2:
            raise ValueError(
                f"parallel.pipeline={self.pipeline.value} needs parallel.pipe >= 2, got {self.pipe}"
            )
        if self.pipeline is Schedule.NONE and self.pipe > 1:
            raise ValueError(
                f"parallel.pipe={self.pipe} needs a parallel.pipeline schedule "
                "(dualpipe, dualpipev, 1f1b or gpipe)"
            )

    @property
    def num_microbatches(self) -> int:
        return self.microbatches or 2 * self.pipe

    def sizes(self) -> dict[str, int]:
        """Axis sizes as configured ({'data': -1, ...} before the device count is known)."""
        return {name: getattr(self, name) for name in AXIS_FIELDS}


def check_pipeline(parallel: ParallelConfig, model: Any, train: Any) -> None:
    """Cross-section checks of a pipelined run, before anything is compiled (ValueError naming
    the fields). `model` is a ModelConfig, `train` a TrainConfig. Checks that need the device
    count (micro-batch rows per data shard) are in validate.py."""
    if parallel.pipeline is Schedule.NONE:
        return
    from deepseek_jax.parallel.pipeline import schedules  # pure Python, no JAX at config time

    name, pp, M = parallel.pipeline.value, parallel.pipe, parallel.num_microbatches
    try:
        orders = schedules.build(parallel.pipeline, pp, M)
    except ValueError as e:
        raise ValueError(
            f"parallel.pipeline={name} with parallel.pipe={pp} and parallel.microbatches={M}: {e}"
        ) from None
    stages = orders.num_stages
    if model.n_moe_layers < stages:
        raise ValueError(
            f"model.n_layers: the {model.n_moe_layers} MoE layers (n_layers={model.n_layers} - "
            f"first_k_dense_replace={model.first_k_dense_replace}) cannot fill the "
            f"{stages} stages of {name} on {pp} ranks: at least one per stage (dense layers run "
            "with the embedding on the first stage; an uneven count is padded, "
            "stages.layer_counts)"
        )
    if train.global_batch_size % M:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not divisible "
            f"into parallel.microbatches={M}"
        )
    for field in ("fsdp", "tensor"):
        if getattr(parallel, field) != 1:
            raise ValueError(
                f"parallel.{field}={getattr(parallel, field)} is not supported with "
                f"parallel.pipeline={name} (the pipeline composes with data and "
                "expert parallelism only)"
            )
    if parallel.preset not in PIPELINE_PRESETS:
        raise ValueError(
            f"parallel.preset={parallel.preset.value} is not supported with "
            f"parallel.pipeline={name} (allowed: "
            f"{[p.value for p in PIPELINE_PRESETS]})"
        )
