"""Accelerator catalogue: dense peak FLOP/s per chip, the denominator of every MFU we print.

Peaks are vendor figures for *dense* tensor-core/MXU math (NVIDIA quotes "with sparsity" figures
twice as large; we never use those). `fp8` is the dense FP8 peak; on chips whose FP8 runs at the
BF16 rate (TPU v5p, v6e) or that have no FP8 units (A100, TPU v4, v5e) it equals `bf16`, so an
FP8 estimate there is honest about gaining nothing from the format.

Sources (facts: /work/shared/reference/deepseek_v3_facts.md §0 [GPU-spec], [TPU-spec]):
- H100 SXM: NVIDIA H100 datasheet, 1,979 TF BF16 / 3,958 TF FP8 "with sparsity", i.e. 989.4 /
  1978.9 dense (glennklockwood.com/garden/processors/h100). H100 PCIe: 1,513 / 3,026 sparse.
- H800 SXM: the export variant of H100 SXM with cut NVLink/FP64 but the same tensor cores, so the
  same 989.4 / 1978.9; DeepSeek's FlashMLA deep-dive quotes "peak FLOPs of 990 TFlops" for it.
- H200 SXM: the H100 die with HBM3e; NVIDIA's H200 datasheet lists the same 1,979 / 3,958 sparse.
- B200 (HGX, 1000 W): 2.25 PF BF16 / 4.5 PF FP8 dense; GB200 (per GPU): 2.5 / 5 PF
  (NVIDIA DGX B200 / GB200 NVL72 datasheets; glennklockwood.com/garden/processors/B200).
- A100 SXM: 312 TF BF16 dense (NVIDIA A100 datasheet); no FP8 tensor cores.
- TPU v4 275 TF, v5e 197 TF, v5p 459 TF, v6e (Trillium) 918 TF BF16, FP8 at the BF16 rate;
  TPU7x (Ironwood) 2,307 TF BF16 / 4,614 TF FP8 (cloud.google.com/tpu/docs/v5p, /v6e, /tpu7x).

`jax_kinds` are substrings of `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5",
"TPU v5 lite", "TPU v6 lite", "TPU7x"); `for_device_kind` picks the longest one that matches, so
the trainer's MFU and the cost estimate divide by the same peak.
"""

from __future__ import annotations

import dataclasses
import enum

from deepseek_jax import errors


class Peak(enum.Enum):
    BF16 = "bf16"
    FP8 = "fp8"


class PeakChoice(enum.Enum):
    """The `--peak` flag: AUTO follows the run's matmul format (cost.estimate.peak_for)."""

    AUTO = "auto"
    BF16 = "bf16"
    FP8 = "fp8"


@dataclasses.dataclass(frozen=True)
class Device:
    name: str  # as printed
    kind: str  # "GPU" or "TPU": the unit of the hours column
    bf16: float  # dense FLOP/s per chip
    fp8: float
    jax_kinds: tuple[str, ...]

    def peak(self, which: Peak) -> float:
        return self.bf16 if which is Peak.BF16 else self.fp8


_T = 1e12
CATALOGUE: dict[str, Device] = {
    "h800": Device("H800 SXM", "GPU", 989.4 * _T, 1978.9 * _T, ("H800",)),
    "h100": Device("H100 SXM", "GPU", 989.4 * _T, 1978.9 * _T, ("H100",)),
    "h100pcie": Device("H100 PCIe", "GPU", 756.5 * _T, 1513.0 * _T, ("H100 PCIe",)),
    "h200": Device("H200 SXM", "GPU", 989.4 * _T, 1978.9 * _T, ("H200",)),
    "b200": Device("B200", "GPU", 2250 * _T, 4500 * _T, ("B200",)),
    "gb200": Device("GB200", "GPU", 2500 * _T, 5000 * _T, ("GB200",)),
    "a100": Device("A100 SXM", "GPU", 312 * _T, 312 * _T, ("A100",)),
    "v4": Device("TPU v4", "TPU", 275 * _T, 275 * _T, ("TPU v4",)),
    "v5e": Device("TPU v5e", "TPU", 197 * _T, 197 * _T, ("TPU v5 lite", "TPU v5e")),
    "v5p": Device("TPU v5p", "TPU", 459 * _T, 459 * _T, ("TPU v5", "TPU v5p")),
    "v6e": Device("TPU v6e", "TPU", 918 * _T, 918 * _T, ("TPU v6 lite", "TPU v6e")),
    "7x": Device("TPU7x", "TPU", 2307 * _T, 4614 * _T, ("TPU7x",)),
}
_ALIASES = {"ironwood": "7x", "v7x": "7x", "trillium": "v6e", "v5lite": "v5e", "v6lite": "v6e"}


def _key(name: str) -> str:
    key = name.lower().replace("nvidia", "").replace("tpu", "")
    for ch in " -_":
        key = key.replace(ch, "")
    key = key.removesuffix("sxm5").removesuffix("sxm")
    return _ALIASES.get(key, key)


def get(name: str, flag: str = "--device") -> Device:
    """The catalogue entry for `name` ("h800", "H100", "tpu-v5p", "TPU7x", "ironwood", ...)."""
    key = _key(name)
    if key not in CATALOGUE:
        raise errors.UserError(
            f"{flag}={name}: unknown device{errors.did_you_mean(key, CATALOGUE)}; known: "
            + ", ".join(CATALOGUE)
        )
    return CATALOGUE[key]


def for_device_kind(device_kind: str) -> Device | None:
    """The entry whose `jax_kinds` substring matches `device_kind` best (longest), or None."""
    kind = device_kind.lower()
    best, length = None, 0
    for dev in CATALOGUE.values():
        for sub in dev.jax_kinds:
            if sub.lower() in kind and len(sub) > length:
                best, length = dev, len(sub)
    return best
