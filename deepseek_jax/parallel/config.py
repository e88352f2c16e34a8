"""Typed parallelism settings (the `parallel` section of an experiment config).

Mesh axis sizes and the logical-axis rules preset. The sharding layer (parallel/sharding.py, mesh.py)
interprets them; -1 for `data` means "whatever the device count leaves".
`pipeline` selects a pipeline schedule over the `stage` axis (`--config.parallel.pipeline=dualpipe`);
`microbatches` is the total per step (DualPipe's num_chunks: half enter at each end).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Pipeline(enum.Enum):
    """Pipeline schedule, or none. Values are those of `schedules.Schedule` plus "none"."""

    NONE = "none"
    DUALPIPE = "dualpipe"
    DUALPIPEV = "dualpipev"
    ONE_F_ONE_B = "1f1b"
    GPIPE = "gpipe"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    stage: int = 1
    pipeline: Pipeline = Pipeline.NONE
    microbatches: int = 0  # per step; 0: 2 * stage, the least DualPipe accepts

    def __post_init__(self):
        if self.microbatches < 0:
            raise ValueError(f"parallel.microbatches must be >= 0, got {self.microbatches}")
        if self.pipeline is not Pipeline.NONE and self.stage < 2:
            raise ValueError(f"parallel.pipeline={self.pipeline.value} needs parallel.stage >= 2, "
                             f"got {self.stage}")
        if self.pipeline is Pipeline.NONE and self.stage > 1:
            raise ValueError(f"parallel.stage={self.stage} needs a parallel.pipeline schedule "
                             "(dualpipe, dualpipev, 1f1b or gpipe)")

    @property
    def num_microbatches(self) -> int:
        return self.microbatches or 2 * self.stage


def check_pipeline(parallel: ParallelConfig, model: Any, train: Any) -> None:
    """Cross-section checks of a pipelined run, before anything is compiled (ValueError naming
    the fields). `model` is a ModelConfig, `train` a TrainConfig."""
    if parallel.pipeline is Pipeline.NONE:
        return
    from deepseek_jax.parallel import schedules  # pure Python; no JAX import at config time

    name, pp, M = parallel.pipeline.value, parallel.stage, parallel.num_microbatches
    try:
        plan = schedules.build(name, pp, M)
    except ValueError as e:
        raise ValueError(f"parallel.pipeline={name} with parallel.stage={pp} and "
                         f"parallel.microbatches={M}: {e}") from None
    stages = plan.num_stages
    if model.n_moe_layers < stages or model.n_moe_layers % stages:
        raise ValueError(
            f"model.n_layers: the {model.n_moe_layers} MoE layers (n_layers={model.n_layers} - "
            f"first_k_dense_replace={model.first_k_dense_replace}) must split evenly into the "
            f"{stages} stages of {name} on {pp} ranks, at least one per stage (dense layers run "
            "with the embedding on the first stage)")
    if train.global_batch_size % M:
        raise ValueError(f"train.global_batch_size={train.global_batch_size} is not divisible "
                         f"into parallel.microbatches={M}")
    for field in ("fsdp", "tensor"):
        if getattr(parallel, field) != 1:
            raise ValueError(f"parallel.{field}={getattr(parallel, field)} is not supported with "
                             f"parallel.pipeline={name} (the pipeline composes with data and "
                             "expert parallelism only)")
