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
cuBLASLt GEMM only for scalar (per-tensor) scales; with per-tile scales the optimised H100 HLO
(a deviceless compile, bench/fp8_step.py --target=h100) has the quantized E4M3 operands, a
separate dequantize and a wider GEMM: FP8 numerics, not FP8 speed, until a dedicated kernel
(Pallas) takes this module's place. This module is its definitional reference.

`matmul` (x [M, K] @ w [K, N]) is a custom_vjp: dgrad dx = dy w^T with dy quantized 1x128 along
N and w in its 128x128 blocks; wgrad dw = x^T dy with x and dy quantized along M (128x1 tiles in
their [M, *] layout). The cotangents pass straight through the quantizers. `grouped_matmul` is
the same recipe around any grouped matmul (jax.lax.ragged_dot or a tiled kernel), passed in. Both
take a `Format`; `BF16` runs the same GEMMs with bfloat16 operands (the precision baseline).
"""

from __future__ import annotations

import dataclasses
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
    # The barrier keeps q an E4M3 array: with its default --xla_allow_excess_precision, XLA:GPU
    # folds the convert pair f32 -> E4M3 -> f32 of q and its dequantize into nothing, so the
    # GEMM would see the unquantized operand (the optimised H100 HLO of bench/fp8_step.py
    # --target=h100 held no f8 value at all without it).
    q = jax.lax.optimization_barrier((x32 / _expand(s, tile, x.shape)).astype(E4M3))
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


@dataclasses.dataclass(frozen=True)
class Format:
    """How the GEMMs below represent each operand: E4M3 with per-tile float32 scales (the V3
    recipe; `pow2`: power-of-two scales), or bfloat16 (the BF16 baseline, on the same skeleton
    so that its dgrad and wgrad are bfloat16 GEMMs too, not float32 cotangents times bf16)."""

    fp8: bool = True
    pow2: bool = False

    def operand(self, t: jax.Array, tile: Sequence[int]) -> jax.Array:
        if self.fp8:
            return fake_quant(t, tile, pow2=self.pow2)
        return t.astype(jnp.bfloat16)


E4M3_BLOCKWISE = Format()
E4M3_BLOCKWISE_POW2 = Format(pow2=True)
BF16 = Format(fp8=False)

# Residuals are the GEMM's own inputs (what autodiff of a plain dot keeps): the backward pass
# requantizes w (deterministically, the same blocks) and quantizes x along the rows for wgrad,
# rather than requantizing the forward's 1x128 tiles, which would round x twice.

# -- the dense GEMM --------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x_MK: jax.Array, w_KN: jax.Array, fmt: Format = E4M3_BLOCKWISE) -> jax.Array:
    """x @ w with both operands in `fmt` (1x128 / 128x128 scales), float32 accumulation; the
    result in x's dtype."""
    y_MN = _dot(fmt.operand(x_MK, tiles_along(2, 1)), fmt.operand(w_KN, blocks(2)), (1, 0))
    return y_MN.astype(x_MK.dtype)


def _matmul_fwd(x_MK, w_KN, fmt):
    return matmul(x_MK, w_KN, fmt), (x_MK, w_KN)


def _matmul_bwd(fmt, res, dy_MN):
    x_MK, w_KN = res
    # dgrad: contraction over N; dy in 1x128 tiles along N, w's blocks used transposed.
    dx_MK = _dot(fmt.operand(dy_MN, tiles_along(2, 1)), fmt.operand(w_KN, blocks(2)), (1, 1))
    # wgrad: contraction over M; x and dy in 128x1 tiles (1x128 along M).
    x_m = fmt.operand(x_MK, tiles_along(2, 0))
    dw_KN = _dot(x_m, fmt.operand(dy_MN, tiles_along(2, 0)), (0, 0))
    return dx_MK.astype(x_MK.dtype), dw_KN.astype(w_KN.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(x: jax.Array, w: jax.Array, dimension_numbers, fmt: Format) -> jax.Array:
    """The Linear contraction (x's trailing dims against w's leading dims, no batch dims) as one
    `matmul` of the flattened [tokens, in] x [in, out] matrices: the 2D layout (and hence the
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
    y = matmul(x.reshape(-1, K), w.reshape(K, -1), fmt)
    return y.reshape(*lead, *out)


# -- the grouped (routed-expert) GEMM ------------------------------------------------------------


def grouped_matmul(
    x_ZD: jax.Array,
    w_EDF: jax.Array,
    group_sizes_E: jax.Array,
    matmul_fn: GroupedMatmul,
    fmt: Format = E4M3_BLOCKWISE,
) -> jax.Array:
    """matmul_fn(x, w, group_sizes) with operands in `fmt`: x in 1x128 tiles along D, each
    expert's w in 128x128 blocks; dgrad and wgrad are matmul_fn's own transposes applied to
    operands quantized along their contraction dims (F for dgrad, the rows Z for wgrad), so any
    grouped matmul (ragged_dot, a tiled kernel) gets FP8 forward and backward: dgrad is
    matmul_fn with transposed weights, wgrad matmul_fn's transpose in w. `matmul_fn`
    receives the operands as `fmt` represents them (float32 dequantized E4M3, or bfloat16) and
    must accumulate in float32. Row tiles for wgrad are fixed 128-row windows of the
    expert-sorted buffer; a window may straddle two experts' groups (still one scale per element,
    so the dequantized operand is exact; a GPU kernel would align groups to 128 rows). Under
    tensor parallelism each rank quantizes its own F-slice of the weights, which gives the
    unsharded blocks when the slice is a multiple of 128 wide."""
    return _grouped(matmul_fn, fmt, x_ZD, w_EDF, group_sizes_E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped(matmul_fn, fmt, x_ZD, w_EDF, group_sizes_E):
    x = fmt.operand(x_ZD, tiles_along(2, 1))
    y_ZF = matmul_fn(x, fmt.operand(w_EDF, blocks(3)), group_sizes_E)
    return y_ZF.astype(x_ZD.dtype)


def _grouped_fwd(matmul_fn, fmt, x_ZD, w_EDF, group_sizes_E):
    return _grouped(matmul_fn, fmt, x_ZD, w_EDF, group_sizes_E), (x_ZD, w_EDF, group_sizes_E)


def _grouped_bwd(matmul_fn, fmt, res, dy_ZF):
    x_ZD, w_EDF, group_sizes_E = res
    w = fmt.operand(w_EDF, blocks(3))
    dy_f = fmt.operand(dy_ZF, tiles_along(2, 1))
    x_z = fmt.operand(x_ZD, tiles_along(2, 0))
    dy_z = fmt.operand(dy_ZF, tiles_along(2, 0))
    # dgrad is itself a grouped matmul, with each expert's weights transposed.
    dx_ZD = matmul_fn(dy_f, jnp.swapaxes(w, 1, 2), group_sizes_E)
    # wgrad contracts the rows of each group: matmul_fn's transpose in w (it is linear, so its
    # VJP at any point is that transpose; the primal jax.vjp also evaluates is unused and XLA
    # drops it). Its operands are float32 holding the format's values (for BF16: bfloat16
    # values), as the VJP takes a cotangent in matmul_fn's float32 output dtype.
    x_z, dy_z = x_z.astype(jnp.float32), dy_z.astype(jnp.float32)
    _, wgrad = jax.vjp(lambda w: matmul_fn(x_z, w, group_sizes_E), w.astype(jnp.float32))
    (dw_EDF,) = wgrad(dy_z)
    return dx_ZD.astype(x_ZD.dtype), dw_EDF.astype(w_EDF.dtype), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
