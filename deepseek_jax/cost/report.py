"""Tables and JSON of a cost estimate: what `python -m deepseek_jax.info --device=...` prints."""

from __future__ import annotations

from deepseek_jax.cost import estimate as estimate_lib


def _si(n: float, digits: int = 2) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{unit}"
    return f"{n:g}"


def _hours(h: float) -> str:
    return f"{h / 1e3:,.1f}K"


def _money(usd: float) -> str:
    return f"${usd / 1e6:,.3f}M" if usd >= 1e6 else f"${usd:,.0f}"


def as_dict(est: estimate_lib.Estimate, n_devices: int | None, price: float | None) -> dict:
    rows = []
    for p in est.phases:
        rows.append(
            {
                "name": p.phase.name,
                "seq_len": p.phase.seq_len,
                "tokens": p.phase.tokens,
                "train_flops_per_token": p.counts.train_flops_per_token,
                "attention_flops_per_token": p.counts.attention_flops_per_token,
                "flops": p.flops,
                "mfu": p.mfu,
                "device_hours": p.device_hours,
            }
        )
    rows += [{"name": f.name, "device_hours": f.hours} for f in est.fixed]
    out = {
        "device": est.device.name,
        "peak": est.peak.value,
        "peak_flops_per_device": est.peak_flops,
        "phases": rows,
        "device_hours": est.device_hours,
    }
    if n_devices:
        out["devices"] = n_devices
        out["days"] = est.device_hours / n_devices / 24
    if price is not None:
        out["price_per_device_hour"] = price
        out["cost"] = est.device_hours * price
    return out


def text(
    est: estimate_lib.Estimate, n_devices: int | None, price: float | None, peak_reason: str = ""
) -> str:
    unit = f"{est.device.kind}-hours"
    head = ["phase", "seq_len", "tokens", "GFLOP/token", "MFU", f"TFLOP/s/{est.device.kind}"]
    head += [unit, f"{unit} per 1T tokens"]
    head += [f"days on {n_devices}"] if n_devices else []
    head += [f"cost at ${price:g}/h"] if price is not None else []

    def tail(h: float) -> list[str]:
        return ([f"{h / n_devices / 24:.1f}"] if n_devices else []) + (
            [_money(h * price)] if price is not None else []
        )

    rows = []
    for p in est.phases:
        rows.append(
            [
                p.phase.name,
                str(p.phase.seq_len),
                _si(p.phase.tokens),
                f"{p.counts.train_flops_per_token / 1e9:.1f}",
                f"{100 * p.mfu:.2f}%",
                f"{p.mfu * est.peak_flops / 1e12:.1f}",
                _hours(p.device_hours),
                _hours(p.device_hours / p.phase.tokens * 1e12),
            ]
            + tail(p.device_hours)
        )
    rows += [[f.name, "", "", "", "", "", _hours(f.hours), ""] + tail(f.hours) for f in est.fixed]
    if len(rows) > 1:
        rows.append(
            ["total", "", "", "", "", "", _hours(est.device_hours), ""] + tail(est.device_hours)
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        f"{est.device.name}: dense {est.peak.value.upper()} peak {est.peak_flops / 1e12:.1f} "
        f"TFLOP/s per chip{f' ({peak_reason})' if peak_reason else ''}; FLOPs per token from "
        "deepseek_jax.model.counting (the trainer's MFU)"
    ]
    for r in [head, *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
        )
    return "\n".join(lines)


def inverse_text(
    est_device, peak, inv: dict, device_hours: float, tokens: float, peak_reason: str = ""
) -> str:
    unit = f"{est_device.kind}-hours"
    no_mtp = inv["mfu_no_mtp"]
    why = f", {peak_reason}" if peak_reason else ""
    return (
        f"implied MFU on {est_device.name} (dense {peak.value.upper()} peak "
        f"{est_device.peak(peak) / 1e12:.1f} TFLOP/s{why}): {100 * inv['mfu']:.2f}%"
        + (f" ({100 * no_mtp:.2f}% without MTP)" if no_mtp != inv["mfu"] else "")
        + "\n"
        f"  {_hours(device_hours)} {unit} for {_si(tokens)} tokens, {inv['flops']:.4g} FLOPs: "
        f"{inv['flops_per_s_per_device'] / 1e12:.1f} TFLOP/s per {est_device.kind}"
    )
