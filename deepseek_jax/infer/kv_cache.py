"""KV caches for decoding: the MLA latent cache and the naive full per-head cache.

Latent (what absorbed decode reads): per layer, the normalised latent c_kv [B, T, C] and the roped
shared key k_rope [B, T, R] -- nothing per head, (C + R) numbers per token per layer (576 for V3).
Full (the MHA-equivalent reference): per layer, k [B, T, H, N+R] and v [B, T, H, V], what the
official code's `attn_impl="naive"` keeps.

A cache is one pytree: a dict of per-stack arrays with a leading layer axis ("dense", "moe" for the
main model, "mtp" for the MTP module's own cache) and `length_B`, the number of valid positions of
each row. Entries at positions >= length are stale (padding, rejected drafts) and are never read:
attention masks keys by position, and the next write overwrites them.

Every array has logical axes, so the same rules table shards it: batch over the batch axes, the
latent replicated (its one vector serves all heads), the full cache's heads like the weights'.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.model import config as config_lib


class DecodeMode(enum.Enum):
    ABSORBED = "absorbed"  # latent cache, W_UK folded into the query, W_UV after attention
    NAIVE = "naive"  # full per-head K/V cache (reference, benchmarks)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentKV:
    c_kv_LBTC: jax.Array
    k_rope_LBTR: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FullKV:
    k_LBTHK: jax.Array
    v_LBTHV: jax.Array


LayerKV = LatentKV | FullKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    stacks: dict[str, LayerKV]
    length_B: jax.Array  # int32: valid positions per row

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.stacks)[0].shape[2]

    def with_length(self, length_B: jax.Array) -> Cache:
        return Cache(self.stacks, length_B.astype(jnp.int32))


def stack_sizes(cfg: config_lib.ModelConfig) -> dict[str, int]:
    sizes = {"dense": cfg.n_dense_layers, "moe": cfg.n_moe_layers}
    return {k: v for k, v in sizes.items() if v}


def _stack(cfg: config_lib.ModelConfig, L: int, B: int, T: int, mode: DecodeMode, dtype) -> LayerKV:
    if mode is DecodeMode.ABSORBED:
        return LatentKV(
            jnp.zeros((L, B, T, cfg.kv_lora_rank), dtype),
            jnp.zeros((L, B, T, cfg.qk_rope_head_dim), dtype),
        )
    K = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return FullKV(
        jnp.zeros((L, B, T, cfg.n_heads, K), dtype),
        jnp.zeros((L, B, T, cfg.n_heads, cfg.v_head_dim), dtype),
    )


def init(
    cfg: config_lib.ModelConfig,
    batch: int,
    max_len: int,
    mode: DecodeMode,
    dtype: Any = jnp.float32,
) -> Cache:
    """The main model's cache, zero, length 0 (use under jax.eval_shape for sizes)."""
    stacks = {k: _stack(cfg, L, batch, max_len, mode, dtype) for k, L in stack_sizes(cfg).items()}
    return Cache(stacks, jnp.zeros((batch,), jnp.int32))


def init_mtp(
    cfg: config_lib.ModelConfig,
    batch: int,
    max_len: int,
    mode: DecodeMode,
    dtype: Any = jnp.float32,
) -> Cache:
    """The MTP modules' own cache: one layer per module (model.mtp_depth), one length."""
    if not cfg.mtp_depth:
        raise ValueError("model.mtp_depth is 0: this model has no MTP module to cache")
    return Cache(
        {"mtp": _stack(cfg, cfg.mtp_depth, batch, max_len, mode, dtype)},
        jnp.zeros((batch,), jnp.int32),
    )


_AXES = {
    # Batch over the batch axes; the latent and shared rope key replicated over tensor (one
    # vector serves every head, and the per-head W_UK/W_UV slices live with their heads).
    "c_kv_LBTC": ("act_batch", "act_seq", None),
    "k_rope_LBTR": ("act_batch", "act_seq", None),
    "k_LBTHK": ("act_batch", "act_seq", "act_heads", None),
    "v_LBTHV": ("act_batch", "act_seq", "act_heads", None),
}


def logical_axes(cache: Cache) -> Cache:
    """The same pytree with a tuple of logical axis names in place of each array."""

    def stack_axes(name: str, kv: LayerKV) -> LayerKV:
        lead = "mtp_layers" if name == "mtp" else "layers"
        fields = {f.name: (lead,) + _AXES[f.name] for f in dataclasses.fields(kv)}
        return type(kv)(**fields)

    return Cache({k: stack_axes(k, v) for k, v in cache.stacks.items()}, ("act_batch",))


def nbytes(cache: Cache) -> int:
    """Bytes of the cache arrays (lengths excluded); works on ShapeDtypeStructs too."""
    return sum(
        math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(cache.stacks)
    )


def bytes_per_token(cfg: config_lib.ModelConfig, mode: DecodeMode, dtype: Any) -> int:
    """The formula: (C + R) * layers * itemsize latent, (H*(N+R) + H*V) * layers * itemsize full."""
    item = jnp.dtype(dtype).itemsize
    if mode is DecodeMode.ABSORBED:
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return per_layer * cfg.n_layers * item


def write(stack: LayerKV, new: LayerKV, start_B: jax.Array, layer: int = 0) -> LayerKV:
    """Every array buf [L', B, T, ...] of a stack gets buf[layer + l, b, start_b : start_b + S] =
    new[l, b] for new [L, B, S, ...] (trailing dims copied whole): the entries of L layers, one
    update per array, in place when the cache is donated.

    The caller guarantees start_b + S <= T (dynamic_update_slice would clamp, i.e. shift, the
    write otherwise): generation sizes the cache for prompt + new tokens + drafts.
    """

    def one(buf_LBT, new_LBS):
        def row(buf, upd, start):  # one batch row: buf [L', T, ...], upd [L, S, ...]
            idx = (jnp.int32(layer), start) + (jnp.int32(0),) * (buf.ndim - 2)
            return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), idx)

        return jax.vmap(row, in_axes=(1, 1, 0), out_axes=1)(buf_LBT, new_LBS, start_B)

    return jax.tree.map(one, stack, new)


def shardings(cache: Cache, mesh, rules) -> Cache:
    """NamedShardings of every cache array under a rules table (parallel/sharding.py)."""
    from jax.sharding import NamedSharding

    from deepseek_jax.parallel import mesh as mesh_lib
    from deepseek_jax.parallel import sharding as sharding_lib

    sizes = mesh_lib.sizes_of(mesh)

    def one(a, axes):
        return NamedSharding(mesh, sharding_lib.spec(rules, axes, a.shape, sizes, f"cache {axes}"))

    return jax.tree.map(one, cache, logical_axes(cache))
