"""Inference: scoring (score.py), and generation with the MLA latent KV cache.

- `kv_cache`: the latent cache (and the naive full per-head cache), per-row lengths, shardings;
- `decode`: prefill with the training math, absorbed or naive decode, the k+1-token verify;
- `sampling`, `generation`: batched greedy/temperature/top-k/top-p generation, one compiled step;
- `speculative`: MTP self-speculative decoding; `load`: checkpoints with their MTP weights.

These are libraries; the command-line tools that drive them (`python -m deepseek_jax.score`,
`python -m deepseek_jax.generate`) live at the package root.
"""
