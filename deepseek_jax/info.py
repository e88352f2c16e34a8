"""Model size, compute and KV-cache figures of a config, and what training it costs.

    python -m deepseek_jax.info --config=configs/deepseek_v3_671b.py [--json]
    python -m deepseek_jax.info --config=configs/deepseek_v3_671b.py --device=h800 \
        --tokens=14.8T --mfu=0.4065 [--num_devices=2048] [--price=2]        # one phase
        [--phase=[NAME:]SEQ_LEN:TOKENS[:MFU] ...] [--add_hours=NAME:HOURS]   # or a list
        [--device_hours=2664e3]                                             # inverse: the MFU
        [--mfu=measured --bench_json=bench.json]                            # a run's MFU
        [--peak=auto|bf16|fp8]      # auto: the FP8 peak under model.matmul_policy=fp8_blockwise

Figures come from abstract shapes (nothing allocated); FLOPs use train.seq_len (`--tokens`) or
each phase's SEQ_LEN, from the counter the trainer logs MFU with (docs/cost.md).
"""

from __future__ import annotations

import dataclasses
import json

from absl import app, flags

from deepseek_jax import cli, errors
from deepseek_jax.cost import devices, estimate, phases
from deepseek_jax.cost import report as cost_report
from deepseek_jax.model import counting

_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_DEVICE = flags.DEFINE_string(
    "device", None, f"Cost: accelerator ({', '.join(devices.CATALOGUE)})."
)
_TOKENS = flags.DEFINE_string("tokens", None, "Cost: tokens of one phase at train.seq_len (14.8T).")
_PHASE = flags.DEFINE_multi_string(
    "phase", [], "Cost: [NAME:]SEQ_LEN:TOKENS[:MFU], repeated for several phases."
)
_MFU = flags.DEFINE_string(
    "mfu", None, "Cost: MFU in (0, 1] of phases without their own, or 'measured' (--bench_json)."
)
_BENCH_JSON = flags.DEFINE_string(
    "bench_json",
    None,
    "Cost: bench/train_step.py --json output or a metrics.jsonl (--mfu=measured).",
)
_DEVICE_HOURS = flags.DEFINE_string(
    "device_hours", None, "Cost, inverse mode: device-hours the phases took; prints the MFU."
)
flags.DEFINE_alias("gpu_hours", "device_hours")
_ADD_HOURS = flags.DEFINE_multi_string(
    "add_hours", [], "Cost: NAME:HOURS added as they are (e.g. post-training:5e3)."
)
_PEAK = flags.DEFINE_enum_class(
    "peak",
    devices.PeakChoice.AUTO,
    devices.PeakChoice,
    "Cost: the peak MFU is relative to; auto: FP8 when model.matmul_policy is an FP8 policy.",
)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Cost: devices, for days.", lower_bound=1)
_PRICE = flags.DEFINE_float("price", None, "Cost: USD per device-hour.", lower_bound=0)


def report(exp) -> dict:
    c = counting.count(exp.model, exp.train.seq_len)
    out = dataclasses.asdict(c)
    out["compute_dtype"] = exp.model.compute_dtype.value
    out["kv_cache_ratio_mha_over_mla"] = c.mha_kv_cache_bytes_per_token / c.kv_cache_bytes_per_token
    out["notes"] = {
        "total_params": "main model incl. embedding and head; MTP excluded (mtp_params)",
        "active_params": "per token, incl. the input embedding and the head",
        "matmul_active_params": "active minus the embedding lookup and norm weights",
        "mtp_params": "unique MTP parameters (shared embedding and head not counted)",
        "train_flops_per_token": "6*matmul_active + 6*causal attention at seq_len, + MTP",
        "kv_cache_bytes_per_token": "MLA latent (kv_lora_rank + rope dim) x layers x dtype bytes",
        "mha_kv_cache_bytes_per_token": "2 x heads x v_head_dim x layers x dtype bytes",
    }
    return out


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def _cost_phases(exp) -> list[phases.Phase]:
    if _TOKENS.value is not None and _PHASE.value:
        raise errors.UserError("--tokens and --phase: give one phase with --tokens or a list")
    if _TOKENS.value is not None:
        try:
            tokens = phases.positive(_TOKENS.value, "tokens")
        except ValueError as e:
            raise errors.UserError(f"--tokens={_TOKENS.value}: {e}") from None
        return [phases.Phase(f"seq {exp.train.seq_len}", exp.train.seq_len, tokens)]
    if not _PHASE.value:
        raise errors.UserError("--device: give the tokens to train on, --tokens or --phase")
    return [phases.parse_phase(p) for p in _PHASE.value]


def cost(exp) -> None:
    if _DEVICE.value is None:
        raise errors.UserError("--device is required for a cost estimate (e.g. --device=h800)")
    device = devices.get(_DEVICE.value)
    todo = _cost_phases(exp)
    fixed = [phases.parse_fixed(f) for f in _ADD_HOURS.value]
    peak, peak_reason = estimate.peak_for(exp.model.matmul_policy, _PEAK.value)
    if _DEVICE_HOURS.value is not None:
        if _MFU.value is not None or any(p.mfu is not None for p in todo):
            raise errors.UserError("--device_hours asks for the MFU: drop --mfu and phase MFUs")
        try:
            hours = phases.positive(_DEVICE_HOURS.value, "device-hours")
        except ValueError as e:
            raise errors.UserError(f"--device_hours={_DEVICE_HOURS.value}: {e}") from None
        inv = estimate.inverse(exp.model, todo, device, hours, peak)
        if _JSON.value:
            head = {"device": device.name, "device_hours": hours, "peak": peak.value}
            print(json.dumps({**head, "peak_reason": peak_reason, **inv}, sort_keys=True))
        else:
            tokens = sum(p.tokens for p in todo)
            print(cost_report.inverse_text(device, peak, inv, hours, tokens, peak_reason))
        return
    mfu, source = None, None
    if _MFU.value == "measured":
        if _BENCH_JSON.value is None:
            raise errors.UserError("--mfu=measured reads --bench_json=FILE: give the file")
        mfu, source = estimate.measured_mfu(_BENCH_JSON.value, peak)
    elif _MFU.value is not None:
        try:
            mfu = phases.fraction(_MFU.value)
        except ValueError as e:
            raise errors.UserError(f"--mfu={_MFU.value}: {e}") from None
    est = estimate.estimate(exp.model, todo, device, peak, mfu, fixed)
    if _JSON.value:
        out = cost_report.as_dict(est, _NUM_DEVICES.value, _PRICE.value)
        out["peak_reason"] = peak_reason
        if source:
            out["mfu_source"] = source
        print(json.dumps(out, sort_keys=True))
        return
    print(cost_report.text(est, _NUM_DEVICES.value, _PRICE.value, peak_reason))
    if source:
        print(f"MFU {100 * mfu:.2f}% from {_BENCH_JSON.value}: {source}")


def main(argv):
    del argv
    exp = cli.experiment()
    if _DEVICE.value or _TOKENS.value or _PHASE.value or _DEVICE_HOURS.value:
        cost(exp)
        return
    r = report(exp)
    if _JSON.value:
        print(json.dumps(r, sort_keys=True))
        return
    rows = [
        ("total params", _fmt(r["total_params"])),
        ("active params / token", _fmt(r["active_params"])),
        ("  of which embedding (counted)", _fmt(r["embedding_params"])),
        ("matmul-active params", _fmt(r["matmul_active_params"])),
        ("MTP params (unique)", _fmt(r["mtp_params"])),
        ("MTP active params", _fmt(r["mtp_active_params"])),
        (f"train FLOPs / token (S={r['seq_len']})", _fmt(r["train_flops_per_token"])),
        ("  without MTP", _fmt(r["train_flops_per_token_no_mtp"])),
        ("  of which attention", _fmt(r["attention_flops_per_token"])),
        (f"KV cache / token, MLA ({r['compute_dtype']})", f"{r['kv_cache_bytes_per_token']:,} B"),
        ("KV cache / token, MHA equivalent", f"{r['mha_kv_cache_bytes_per_token']:,} B"),
        ("MHA / MLA", f"{r['kv_cache_ratio_mha_over_mla']:.1f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    app.run(errors.guard(main), flags_parser=cli.parse_flags)
