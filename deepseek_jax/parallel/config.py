"""Typed parallelism settings (the `parallel` section of an experiment config).

Mesh axis sizes and the logical-axis rules preset. The sharding layer (parallel/sharding.py, mesh.py)
interprets them; -1 for `data` means "whatever the device count leaves".
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    stage: int = 1
