"""DeepSeek-V3's FP8 GEMM recipe: fine-grained E4M3 quantization and FP8 forward and backward.

Every operand of every GEMM is quantized to float8_e4m3fn along that GEMM's contraction dimension,
with one float32 scale per tile (online max-abs scaling, V3 report §3.3):

- activations and activation gradients: 1x128 tiles (one token, 128 channels of the contraction),
- weights: 128x128 blocks, which serve the forward and the transposed (dgrad) GEMM alike.

The scale of a tile is amax/448 (448 = E4M3's largest finite value), optionally rounded up to a
power of two (the ue8m0 scales of DeepSeek's later kernels: then dequantization is exact in any
binary float format). Edge tiles that do not fill 128 elements are scaled by the amax of the
elements they have, the official FP8 checkpoints' convention (zero padding never raises an amax).
An all-zero tile gets the smallest normal float32 as its scale, so q = 0 and nothing divides by
zero. Unlike the released inference kernels we do not floor amax at 1e-4: activation gradients
of a mean loss are routinely far smaller, and the floor would push them into E4M3's subnormals.

The GEMM dequantizes (convert f8 -> float32, multiply by the broadcast scales) into a dot with
`preferred_element_type=float32`: float32 accumulation, i.e. the ideal limit of the V3 recipe's
"promote the tensor-core partial sums to FP32 every 128 elements". On CPU this is an emulation
(no FP8 arithmetic). On XLA:GPU, the FP8 rewriter fuses convert -> scale -> dot into an FP8
cuBLASLt GEMM only for scalar (per-tensor) scales; with per-tile scales expect a fused dequantize
and a BF16/F32 GEMM until a dedicated kernel (Pallas) takes this module's place. This module is
its definitional reference. We could not inspect the GPU HLO in the session that wrote it.

`matmul` (x [M, K] @ w [K, N]) is a custom_vjp: dgrad dx = dy w^T with dy quantized 1x128 along
N and the forward's quantized w; wgrad dw = x^T dy with x and dy quantized along M (128x1 tiles
in their [M, *] layout). The cotangents pass straight through the quantizers. `grouped_matmul`
is the same recipe around any grouped matmul (jax.lax.ragged_dot or a tiled kernel), passed in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
_TINY = float(jnp.finfo(jnp.float32).tiny)

# (x_ZD, w_EDF, group_sizes_E) -> y_ZF: rows grouped by expert times their expert's weights.
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def tiles_along(ndim: int, axis: int, tile: int = TILE) -> tuple[int, ...]:
    """Tile shape of 1 x `tile` along `axis` (1 elsewhere): an activation's quantization."""
    axis = axis % ndim
    return tuple(tile if d == axis else 1 for d in range(ndim))


def blocks(ndim: int, tile: int = TILE) -> tuple[int, ...]:
    """`tile` x `tile` blocks on the last two dims (leading dims, e.g. experts, one each)."""
    return (1,) * (ndim - 2) + (tile, tile)


def _tiled(x: jax.Array, tile: Sequence[int]) -> jax.Array:
    """x zero-padded to whole tiles and reshaped to [n0/t0, t0, n1/t1, t1, ...]."""
    padded = [math.ceil(n / t) * t for n, t in zip(x.shape, tile)]
    x = jnp.pad(x, [(0, p - n) for p, n in zip(padded, x.shape)])
    return x.reshape([d for p, t in zip(padded, tile) for d in (p // t, t)])


def _expand(s: jax.Array, tile: Sequence[int], shape: Sequence[int]) -> jax.Array:
    """Per-tile scales broadcast to every element of `shape` (edge tiles cut to size): a
    broadcast, a reshape and a slice, which XLA fuses into the multiply that consumes it."""
    s = s.reshape([d for n in s.shape for d in (n, 1)])
    s = jnp.broadcast_to(s, [d for n, t in zip(s.shape[::2], tile) for d in (n, t)])
    s = s.reshape([n * t for n, t in zip(s.shape[::2], tile)])
    return s[tuple(slice(0, n) for n in shape)]


def quantize(
    x: jax.Array, tile: Sequence[int], *, pow2: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(q float8_e4m3fn with x's shape, float32 scales [ceil(n_i / tile_i)]): x ~ q * scale."""
    if len(tile) != x.ndim:
        raise ValueError(f"tile {tuple(tile)} does not match an operand of shape {x.shape}")
    x32 = x.astype(jnp.float32)
    tiled = _tiled(jnp.abs(x32), tile)
    amax = jnp.max(tiled, axis=tuple(range(1, tiled.ndim, 2)))
    s = jnp.maximum(amax / E4M3_MAX, _TINY)
    if pow2:
        s = jnp.exp2(jnp.ceil(jnp.log2(s)))
    q = (x32 / _expand(s, tile, x.shape)).astype(E4M3)
    return q, s


def dequantize(q: jax.Array, s: jax.Array, tile: Sequence[int]) -> jax.Array:
    """float32 q * scale: the convert -> multiply that feeds the dot."""
    return q.astype(jnp.float32) * _expand(s, tile, q.shape)


def fake_quant(x: jax.Array, tile: Sequence[int], *, pow2: bool = False) -> jax.Array:
    """dequantize(quantize(x)): the value an operand has inside the FP8 GEMM."""
    return dequantize(*quantize(x, tile, pow2=pow2), tile)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32
    )


# -- the dense GEMM --------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x_MK: jax.Array, w_KN: jax.Array, pow2: bool = False) -> jax.Array:
    """x @ w with both operands in FP8 (1x128 / 128x128 scales), float32 accumulation; x's dtype."""
    return _matmul_fwd(x_MK, w_KN, pow2)[0]


def _matmul_fwd(x_MK, w_KN, pow2):
    wq, ws = quantize(w_KN, blocks(2), pow2=pow2)
    x_deq = fake_quant(x_MK, tiles_along(2, 1), pow2=pow2)
    y_MN = _dot(x_deq, dequantize(wq, ws, blocks(2)), (1, 0))
    # x is kept at its own precision and requantized along M for wgrad (rather than requantizing
    # the forward's 1x128 tiles, which would round it twice); w is kept in FP8.
    return y_MN.astype(x_MK.dtype), (x_MK, wq, ws, jnp.zeros((), w_KN.dtype))


def _matmul_bwd(pow2, res, dy_MN):
    x_MK, wq, ws, w_like = res
    # dgrad: contraction over N; dy in 1x128 tiles along N, w's blocks reused transposed.
    dy_n = fake_quant(dy_MN, tiles_along(2, 1), pow2=pow2)
    dx_MK = _dot(dy_n, dequantize(wq, ws, blocks(2)), (1, 1))
    # wgrad: contraction over M; x and dy in 128x1 tiles (1x128 along M).
    x_m = fake_quant(x_MK, tiles_along(2, 0), pow2=pow2)
    dy_m = fake_quant(dy_MN, tiles_along(2, 0), pow2=pow2)
    dw_KN = _dot(x_m, dy_m, (0, 0))
    return dx_MK.astype(x_MK.dtype), dw_KN.astype(w_like.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(x: jax.Array, w: jax.Array, dimension_numbers, pow2: bool = False) -> jax.Array:
    """The Linear contraction (x's trailing dims against w's leading dims, no batch dims) as one
    FP8 `matmul` of the flattened [tokens, in] x [in, out] matrices: the 2D layout (and hence the
    128x128 blocks) of the official checkpoints' weights."""
    (cx, cw), (bx, bw) = dimension_numbers
    rank = len(cx)
    if (
        bx
        or bw
        or tuple(cx) != tuple(range(x.ndim - rank, x.ndim))
        or tuple(cw) != tuple(range(rank))
    ):
        raise ValueError(
            f"FP8 dot_general supports x's trailing dims against w's leading dims without batch "
            f"dims (a Linear), got dimension_numbers {dimension_numbers}"
        )
    lead, out = x.shape[: x.ndim - rank], w.shape[rank:]
    K = math.prod(w.shape[:rank])
    y = matmul(x.reshape(-1, K), w.reshape(K, -1), pow2)
    return y.reshape(*lead, *out)


# -- the grouped (routed-expert) GEMM ------------------------------------------------------------


def grouped_matmul(
    x_ZD: jax.Array,
    w_EDF: jax.Array,
    group_sizes_E: jax.Array,
    matmul_fn: GroupedMatmul,
    pow2: bool = False,
) -> jax.Array:
    """matmul_fn(x, w, group_sizes) with the FP8 recipe: x in 1x128 tiles along D, each expert's
    w in 128x128 blocks; dgrad and wgrad are matmul_fn's own transposes applied to operands
    quantized along their contraction dims (F for dgrad, the rows Z for wgrad), so any grouped
    matmul (ragged_dot, a tiled kernel) gets FP8 forward and backward. `matmul_fn` receives
    float32 operands and must accumulate in float32. Row tiles for wgrad are fixed 128-row windows
    of the expert-sorted buffer; a window may straddle two experts' groups (still one scale per
    element, so the dequantized operand is exact; a GPU kernel would align groups to 128 rows)."""
    return _grouped(matmul_fn, pow2, x_ZD, w_EDF, group_sizes_E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped(matmul_fn, pow2, x_ZD, w_EDF, group_sizes_E):
    return _grouped_fwd(matmul_fn, pow2, x_ZD, w_EDF, group_sizes_E)[0]


def _grouped_fwd(matmul_fn, pow2, x_ZD, w_EDF, group_sizes_E):
    wq, ws = quantize(w_EDF, blocks(3), pow2=pow2)
    x_deq = fake_quant(x_ZD, tiles_along(2, 1), pow2=pow2)
    y_ZF = matmul_fn(x_deq, dequantize(wq, ws, blocks(3)), group_sizes_E)
    res = (x_ZD, wq, ws, group_sizes_E, jnp.zeros((), w_EDF.dtype))
    return y_ZF.astype(x_ZD.dtype), res


def _grouped_bwd(matmul_fn, pow2, res, dy_ZF):
    x_ZD, wq, ws, group_sizes_E, w_like = res
    w_deq = dequantize(wq, ws, blocks(3))
    dy_f = fake_quant(dy_ZF, tiles_along(2, 1), pow2=pow2)
    x_z = fake_quant(x_ZD, tiles_along(2, 0), pow2=pow2)
    dy_z = fake_quant(dy_ZF, tiles_along(2, 0), pow2=pow2)
    # matmul_fn is linear in each operand, so its VJP at any point is its transpose.
    _, dgrad = jax.vjp(lambda x: matmul_fn(x, w_deq, group_sizes_E), x_z)
    _, wgrad = jax.vjp(lambda w: matmul_fn(x_z, w, group_sizes_E), w_deq)
    (dx_ZD,) = dgrad(dy_f)
    (dw_EDF,) = wgrad(dy_z)
    return dx_ZD.astype(x_ZD.dtype), dw_EDF.astype(w_like.dtype), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
