"""The batch: one typed structure from the data pipeline through every step to the loss.

Fields, B rows of S positions (host batches from `data` hold numpy arrays, device batches jax
Arrays; `data.packing.batch_spec` gives the dtypes):
    inputs        int32   [B, S]  token ids fed to the model
    targets       int32   [B, S]  next-token ids (inputs shifted by one)
    loss_mask     float32 [B, S]  1 where the target counts in the loss, 0 on padding
    target_bytes  int32   [B, S]  UTF-8 bytes of each target token (bits/byte); None if unknown
    segment_ids   int32   [B, S]  packed sample 1, 2, ... (0 on padding); None: one sample a row
    positions     int32   [B, S]  position within its sample, restarting at 0; None: 0..S-1

`Batch` is a registered pytree dataclass, so whatever moves a batch -- sharding it over the mesh,
cutting it into pipeline micro-batches, indexing one micro-batch inside the executor -- maps over
all of its fields (None fields are empty subtrees). Adding a field is one edit here plus its
producer and its consumer (the objective); no path in between can drop it. Subclasses that add
fields (registered the same way) pass through every path too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    inputs: Any
    targets: Any
    loss_mask: Any
    target_bytes: Any = None
    segment_ids: Any = None
    positions: Any = None

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Batch:
        """From a mapping of field name -> array (the data pipeline's rows); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(
                f"batch fields {unknown} are not fields of {cls.__name__} ({sorted(names)})"
            )
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The non-None fields by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @property
    def shape(self) -> tuple[int, ...]:
        """[B, S] (or [M, B/M, S] for micro-batches): the shape every field shares."""
        return tuple(self.inputs.shape)
