"""Training cost from the trainer's own FLOP counter: device-hours, days, dollars, implied MFU.

For each phase, training FLOPs = tokens x `counting.count(model, seq_len).train_flops_per_token`,
the number the train loop multiplies tokens/s by to log MFU (train/loop.py), so an MFU measured by
a run and the MFU an estimate assumes are the same quantity. Then

    device-hours = FLOPs / (MFU x peak) / 3600        (forward)
    MFU          = FLOPs / (device-hours x 3600 x peak)   (inverse: the MFU a reported cost implies)

with `peak` the dense BF16 (or FP8) FLOP/s of one chip from `cost.devices`: by default the peak
of the format the run's weight GEMMs use (`peak_for`: FP8 under `model.matmul_policy=
fp8_blockwise`, BF16 otherwise), so an FP8 run is not credited with a 2x headroom it cannot use.
Conventions (causal attention at S/2 keys, MTP counted, embedding lookup not counted) are in
docs/cost.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

from deepseek_jax import errors
from deepseek_jax.cost import devices as devices_lib
from deepseek_jax.cost import phases as phases_lib
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import counting

_FP8_POLICIES = (config_lib.MatmulPolicy.FP8_BLOCKWISE, config_lib.MatmulPolicy.FP8_BLOCKWISE_POW2)


def peak_for(
    policy: config_lib.MatmulPolicy,
    choice: devices_lib.PeakChoice = devices_lib.PeakChoice.AUTO,
) -> tuple[devices_lib.Peak, str]:
    """(the peak MFU is relative to, why): `choice` unless AUTO, else the format of the run's
    weight GEMMs. The trainer's logged MFU and the cost estimate both resolve it here."""
    if choice is not devices_lib.PeakChoice.AUTO:
        return devices_lib.Peak(choice.value), f"--peak={choice.value}"
    peak = devices_lib.Peak.FP8 if policy in _FP8_POLICIES else devices_lib.Peak.BF16
    return peak, f"--peak=auto: model.matmul_policy={policy.value}"


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    phase: phases_lib.Phase
    counts: counting.Counts  # at phase.seq_len
    mfu: float
    device_hours: float

    @property
    def flops(self) -> float:
        return self.phase.tokens * self.counts.train_flops_per_token


@dataclasses.dataclass(frozen=True)
class Estimate:
    device: devices_lib.Device
    peak: devices_lib.Peak
    phases: tuple[PhaseCost, ...]
    fixed: tuple[phases_lib.FixedHours, ...] = ()

    @property
    def peak_flops(self) -> float:
        return self.device.peak(self.peak)

    @property
    def device_hours(self) -> float:
        return sum(p.device_hours for p in self.phases) + sum(f.hours for f in self.fixed)


def hours(flops: float, mfu: float, peak_flops: float) -> float:
    return flops / (mfu * peak_flops) / 3600


def implied_mfu(flops: float, device_hours: float, peak_flops: float) -> float:
    return flops / (device_hours * 3600 * peak_flops)


def estimate(
    model: config_lib.ModelConfig,
    phases: list[phases_lib.Phase],
    device: devices_lib.Device,
    peak: devices_lib.Peak = devices_lib.Peak.BF16,
    mfu: float | None = None,
    fixed: list[phases_lib.FixedHours] = (),
) -> Estimate:
    """Device-hours per phase; a phase without its own MFU takes `mfu`."""
    out = []
    for ph in phases:
        m = ph.mfu if ph.mfu is not None else mfu
        if m is None:
            raise errors.UserError(
                f"--phase {ph.name}: no MFU; give it as SEQ_LEN:TOKENS:MFU or pass --mfu"
            )
        c = counting.count(model, ph.seq_len)
        out.append(
            PhaseCost(ph, c, m, hours(ph.tokens * c.train_flops_per_token, m, device.peak(peak)))
        )
    return Estimate(device, peak, tuple(out), tuple(fixed))


def inverse(
    model: config_lib.ModelConfig,
    phases: list[phases_lib.Phase],
    device: devices_lib.Device,
    device_hours: float,
    peak: devices_lib.Peak = devices_lib.Peak.BF16,
) -> dict[str, float]:
    """The one MFU at which `phases` together take `device_hours`, with and without MTP."""
    counts = [counting.count(model, ph.seq_len) for ph in phases]
    with_mtp = sum(ph.tokens * c.train_flops_per_token for ph, c in zip(phases, counts))
    no_mtp = sum(ph.tokens * c.train_flops_per_token_no_mtp for ph, c in zip(phases, counts))
    p = device.peak(peak)
    return {
        "flops": with_mtp,
        "mfu": implied_mfu(with_mtp, device_hours, p),
        "mfu_no_mtp": implied_mfu(no_mtp, device_hours, p),
        "flops_per_s_per_device": with_mtp / (device_hours * 3600),
    }


def measured_mfu(
    path: str, peak: devices_lib.Peak, flag: str = "--bench_json"
) -> tuple[float, str]:
    """(MFU, where it came from) of a benchmark or training run.

    `path` is either the JSON object `bench/train_step.py --json=FILE` writes (keys `mfu`,
    `model_flops_per_s`, `devices`, `device`, `seq_len`, `config`) or a trainer `metrics.jsonl`
    (the median `mfu` of its train records, the first interval -- compilation -- left out).
    A bench that ran on a catalogued device is re-based on that device's vendor peak (its own
    `mfu` is against the matmul peak it measured, which is what a CPU run has to use)."""
    if not os.path.isfile(path):
        raise errors.UserError(f"{flag}={path}: no such file")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
            mfus = [r["mfu"] for r in records if r.get("split") == "train" and r.get("mfu")]
            if len(mfus) > 1:
                mfus = mfus[1:]
            if not mfus:
                raise ValueError("no train record with an mfu")
            value, source = statistics.median(mfus), f"median of {len(mfus)} train records"
        else:
            d = json.loads(text)
            if not isinstance(d, dict) or not isinstance(d.get("mfu"), (int, float)):
                raise ValueError('expected a JSON object with a number "mfu"')
            dev = devices_lib.for_device_kind(str(d.get("device", "")))
            value, source = float(d["mfu"]), "its mfu (against its measured matmul peak)"
            if dev is not None and d.get("model_flops_per_s") and d.get("devices"):
                value = d["model_flops_per_s"] / (d["devices"] * dev.peak(peak))
                source = f"model FLOP/s over {d['devices']} x {dev.name} {peak.value} peak"
            where = ", ".join(f"{k} {d[k]}" for k in ("config", "seq_len", "device") if k in d)
            source += f"; measured at {where}" if where else ""
        value = phases_lib.fraction(value, "the measured MFU")
    except (ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"{flag}={path}: {e}") from None
    return value, source
