"""Typed training hyperparameters (the `train` section of an experiment config)."""

from __future__ import annotations

import dataclasses
import enum


@dataclasses.dataclass(frozen=True)
class Piecewise:
    """values[i] holds for steps in [boundaries[i-1], boundaries[i]); e.g. MTP lambda 0.3, 0.1."""

    values: tuple[float, ...]
    boundaries: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"piecewise schedule needs len(values) == len(boundaries) + 1, got "
                f"{len(self.values)} values and {len(self.boundaries)} boundaries"
            )
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"piecewise boundaries must increase, got {self.boundaries}")


class MomentDType(enum.Enum):
    """Storage dtype of AdamW's two moments (the V3 recipe keeps them in bfloat16)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    # Learning rate: linear warmup -> constant -> cosine to lr_final over decay_steps -> lr_final.
    lr: float = 1e-3
    lr_final: float = 1e-4
    warmup_steps: int = 20
    constant_steps: int = 0
    decay_steps: int = 0  # 0: decay until the last step
    # AdamW (paper: 0.9/0.95, weight decay 0.1 off norms and biases), global-norm clipping.
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # mu and nu are updated in float32 and stored in this dtype; params stay in param_dtype.
    adam_moment_dtype: MomentDType = MomentDType.FLOAT32
    # DeepSeek-V3 extras: MTP weight lambda, bias update speed gamma, balance-loss alpha.
    mtp_lambda: Piecewise = Piecewise((0.3,))
    bias_update_rate: Piecewise = Piecewise((0.001,))
    balance_alpha: float = 1e-4
    # Loop.
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    max_nonfinite_in_a_row: int = 5

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"train.{field}: {msg}")

        for name in [
            "steps",
            "global_batch_size",
            "seq_len",
            "log_every",
            "eval_every",
            "max_nonfinite_in_a_row",
        ]:
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        for name in [
            "warmup_steps",
            "constant_steps",
            "decay_steps",
            "eval_batches",
            "weight_decay",
            "balance_alpha",
        ]:
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.lr_final < 0:
            fail("lr", f"lr must be positive and lr_final >= 0, got {self.lr}, {self.lr_final}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            fail("b1", f"Adam betas must be in [0, 1), got {self.b1}, {self.b2}")
        if self.grad_clip <= 0:
            fail("grad_clip", f"must be positive, got {self.grad_clip}")
