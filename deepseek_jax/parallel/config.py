"""Typed parallelism settings (the `parallel` section of an experiment config).

Mesh axis sizes, the logical-axis rules preset and the expert-parallel exchange. The sharding layer
(parallel/mesh.py, sharding.py, plan.py) interprets them; -1 for `data` means "whatever the device
count leaves". Which axes a preset may use, and every check that needs the model or the device
count, live in plan.py; what is checked here needs nothing else.
"""

from __future__ import annotations

import dataclasses
import enum


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


AXIS_FIELDS = ("stage", "data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    stage: int = 1  # reserved for the pipeline (issue 5); must be 1 until it exists
    preset: Preset = Preset.DATA
    expert_exchange: ExpertExchange = ExpertExchange.ALL_TO_ALL

    def __post_init__(self):
        for name in AXIS_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"parallel.{name}: expected an int, got {value!r}")
            if value <= 0 and not (name == "data" and value == -1):
                allowed = "a positive int or -1 (fill)" if name == "data" else "a positive int"
                raise ValueError(f"parallel.{name}: must be {allowed}, got {value}")
        if not isinstance(self.preset, Preset):
            raise ValueError(f"parallel.preset: unknown preset {self.preset!r} (allowed: "
                             f"{[p.value for p in Preset]})")
        if not isinstance(self.expert_exchange, ExpertExchange):
            raise ValueError(f"parallel.expert_exchange: unknown value {self.expert_exchange!r} "
                             f"(allowed: {[e.value for e in ExpertExchange]})")

    def sizes(self) -> dict[str, int]:
        """Axis sizes as configured ({'data': -1, ...} before the device count is known)."""
        return {name: getattr(self, name) for name in AXIS_FIELDS}
