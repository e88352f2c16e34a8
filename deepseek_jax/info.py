"""Model size, compute and KV-cache figures of a config, from abstract shapes (nothing allocated).

    python -m deepseek_jax.info --config=configs/deepseek_v3_671b.py [--json]

FLOPs use the training sequence length of the config (train.seq_len).
"""

from __future__ import annotations

import dataclasses
import json

from absl import app, flags

from deepseek_jax import cli, errors
from deepseek_jax.model import counting

_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


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


def main(argv):
    del argv
    exp = cli.experiment()
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
