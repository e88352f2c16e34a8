"""The grouped matmul of the routed experts: rows in contiguous expert groups times their expert.

`matmul(x_ZD, w_EDF, group_sizes_E, impl)` computes y[z] = x[z] @ w[e(z)], where rows
`sum(group_sizes[:e]) .. sum(group_sizes[:e+1]) - 1` belong to expert e (the dispatch sorts them
so) and rows past `sum(group_sizes)` come out as zeros (the expert-parallel receive buffer's
padding). Three implementations, one result (`GroupedMatmul`, the config field
`model.grouped_matmul`):

- RAGGED_DOT: `jax.lax.ragged_dot`. What XLA makes of it, from the optimised HLO of a
  deviceless compile (bench/grouped_hlo.py; jax/jaxlib 0.10.2, libtpu 0.0.42.1, the CUDA 12
  plugin with an H100 target; BENCHMARKS.md):
  - XLA:CPU rewrites it into dense work over every group for every row (cost analysis 8x / 32x
    a dense matmul's at 8 / 32 groups; 23x / 60x the time forward+backward).
  - XLA:GPU (H100) does the same: the rows are expanded to [Z, E*D] (zero outside their group)
    and multiplied by w as one [E*D, F] matrix; the weight gradient is a batched [E, D, Z] x
    [E, Z, F] dot over masked rows. E times the FLOPs in all three GEMMs. Its cuDNN ragged-dot
    fusion (`--xla_gpu_experimental_use_ragged_dot_fusion`) aborts that compile.
  - XLA:TPU (v5e) runs the forward and the input gradient as a Mosaic grouped GEMM (a
    `tpu_custom_call` with per-tile group metadata, exactly the dense FLOPs), but the weight
    gradient as a dense masked [E, Z, D] x [E, Z, F] contraction: 11x the dense FLOPs of the
    three GEMMs at 32 experts.
- TILED: each expert's rows padded to a multiple of `tile` rows, so that every tile belongs to
  one expert, then one [tile, D] x [D, F] matmul per tile in a `lax.scan`, tiles past the last
  used one skipped by a `lax.cond`. Static shapes: at most (Z + E*(tile-1)) // tile tiles.
  Dropless and exact (each output row is one ordinary dot). The gradient is a `custom_vjp`:
  dx is the same tiled product with w transposed, dw accumulates x_tile^T dy_tile into the
  tile's expert in place (float32 or wider); autodiff of the scan measured 1.4x slower (it
  transposes every tile's slice of w into a full-size [E, D, F] cotangent). Alternatives
  measured on XLA:CPU (2 cores, 8192 x 512 -> 256, 32 experts, throwaway prototype): one
  gathered weight copy per tile and one batched einsum, forward 41 ms against 11 ms for the
  scan (XLA:CPU's batched dot is slow); the weight gradient as a segment sum of per-tile
  products, 43 ms against 11 ms for a dense x^T dy; dx and dw fused into one backward scan, no
  faster. Tile size 64 rows: of 32, 64, 128 and 256
  the fastest or tied at both shapes (BENCHMARKS.md); it pads the 32-expert case to 1.12x rows.
- MEGABLOX: the grouped GEMM kernels jax ships for TPU (`jax.experimental.pallas.ops.tpu.
  megablox`, what MaxText runs on TPU): `gmm` for y and, with w transposed, dx; `tgmm` for dw.
  Each visits only the [tm, tk] x [tk, tn] tiles a group covers, so all three GEMMs do the
  dense FLOPs (plus partial tiles at group edges). Off TPU the same kernels run in Pallas
  interpret mode (correct, slow: for tests and CPU smoke runs of a TPU config).

AUTO (`resolve`): MEGABLOX on TPU (RAGGED_DOT's weight gradient is E times the work there),
TILED everywhere else: on CPU it is the fastest (measured), and on GPU RAGGED_DOT is no grouped
GEMM but E times the FLOPs and an E-fold [Z, E*D] copy of the rows, which at a real layer's
size (tens of thousands of rows, 7168 wide) does not fit in memory; TILED does the dense FLOPs
as one small GEMM per tile. Neither has been timed on a GPU here (bench/train_gpu.sh times both);
its 64-row tile is CPU-tuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops

from deepseek_jax.model import config as config_lib

GroupedMatmul = config_lib.GroupedMatmul
TILE = 64  # rows per tile on XLA:CPU, chosen by bench/grouped_matmul.py (BENCHMARKS.md)
# megablox's (m, k, n) tile: jax's default for gmm, not tuned on TPU hardware (none here).
MEGABLOX_TILING = (128, 128, 128)


def resolve(impl: GroupedMatmul, platform: str | None = None) -> GroupedMatmul:
    """AUTO -> the implementation for `platform` (default: jax.default_backend())."""
    if impl is not GroupedMatmul.AUTO:
        return impl
    platform = platform or jax.default_backend()
    return GroupedMatmul.MEGABLOX if platform == "tpu" else GroupedMatmul.TILED


def matmul(
    x_ZD: jax.Array,
    w_EDF: jax.Array,
    group_sizes_E: jax.Array,
    impl: GroupedMatmul = GroupedMatmul.AUTO,
    *,
    tile: int = TILE,
) -> jax.Array:
    """y_ZF[z] = x_ZD[z] @ w_EDF[expert of z]; rows past sum(group_sizes_E) give zeros."""
    impl = resolve(impl)
    if impl is GroupedMatmul.RAGGED_DOT:
        return jax.lax.ragged_dot(x_ZD, w_EDF, group_sizes_E)
    if impl is GroupedMatmul.TILED:
        return tiled(x_ZD, w_EDF, group_sizes_E, tile=tile)
    if impl is GroupedMatmul.MEGABLOX:
        return megablox(x_ZD, w_EDF, group_sizes_E)
    raise ValueError(f"grouped matmul {impl} has no implementation")


def tiled(x_ZD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *, tile: int = TILE):
    Z = x_ZD.shape[0]
    if Z == 0:
        return jnp.zeros((0, w_EDF.shape[-1]), x_ZD.dtype)
    return _tiled(x_ZD, w_EDF, group_sizes_E.astype(jnp.int32), max(1, min(tile, Z)))


def megablox(
    x_ZD: jax.Array,
    w_EDF: jax.Array,
    group_sizes_E: jax.Array,
    *,
    out_dtype=None,
    tiling: tuple[int, int, int] = MEGABLOX_TILING,
    interpret: bool | None = None,
) -> jax.Array:
    """y = x @ w per group by jax's megablox `gmm` (its custom VJP: dx by gmm, dw by tgmm), in
    `out_dtype` (default x's) with float32 accumulation. `interpret`: run the Pallas kernels in
    interpret mode (default: everywhere but TPU).

    megablox needs the rows to be a whole number of m-tiles and leaves rows past the groups
    unwritten (garbage on TPU, NaN when interpreted): the rows are padded to a tile multiple,
    and both x and y pass through a select that zeroes rows past sum(group_sizes), whose
    transpose zeroes those rows of dx as well.
    """
    Z, D = x_ZD.shape
    F = w_EDF.shape[-1]
    if Z == 0:
        return jnp.zeros((0, F), out_dtype or x_ZD.dtype)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    tm = min(tiling[0], -(-Z // 16) * 16)  # 16 rows: the bfloat16 sublane tile
    tk = tiling[1] if D % tiling[1] == 0 else D  # a block is a multiple of 128 lanes or whole
    tn = tiling[2] if F % tiling[2] == 0 else F
    Zp = -(-Z // tm) * tm
    sizes_E = group_sizes_E.astype(jnp.int32)
    valid_Z1 = (jnp.arange(Zp, dtype=jnp.int32) < jnp.sum(sizes_E))[:, None]
    x_pad = jnp.where(valid_Z1, jnp.pad(x_ZD, ((0, Zp - Z), (0, 0))), 0)
    y_ZF = megablox_ops.gmm(
        x_pad, w_EDF, sizes_E, out_dtype or x_ZD.dtype, (tm, tk, tn), None, None, False, interpret
    )
    return jnp.where(valid_Z1, y_ZF, 0)[:Z]


class _Layout:
    """Where every row goes in the padded, tiled buffer of N tiles x T rows.

    dest_Z: padded slot of each row (N*T, a zero row, for rows past sum(group sizes));
    src_S: source row of each padded slot (Z, a zero row, for padding); expert_N: the expert of
    each tile; used: how many tiles hold rows (the rest are skipped).
    """

    def __init__(self, group_sizes_E: jax.Array, Z: int, T: int):
        E = group_sizes_E.shape[0]
        self.N = (Z + E * (T - 1)) // T  # sum_e ceil(g_e / T) can never exceed this
        tiles_E = (group_sizes_E + T - 1) // T
        tile_end_E = jnp.cumsum(tiles_E)
        pad_start_E = (tile_end_E - tiles_E) * T
        end_E = jnp.cumsum(group_sizes_E)
        start_E = end_E - group_sizes_E
        z = jnp.arange(Z, dtype=jnp.int32)
        e_Z = _bucket(end_E, z)  # E for rows past sum(group sizes)
        e_Zc = jnp.minimum(e_Z, E - 1)
        self.dest_Z = jnp.where(e_Z < E, z - start_E[e_Zc] + pad_start_E[e_Zc], self.N * T)
        s = jnp.arange(self.N * T, dtype=jnp.int32)
        e_S = jnp.minimum(_bucket(tile_end_E * T, s), E - 1)
        j_S = s - pad_start_E[e_S]
        self.src_S = jnp.where(j_S < group_sizes_E[e_S], start_E[e_S] + j_S, Z)
        tiles = jnp.arange(self.N, dtype=jnp.int32)
        self.expert_N = jnp.minimum(_bucket(tile_end_E, tiles), E - 1)
        self.used = tile_end_E[-1]
        self.T = T

    def pad(self, x_ZD: jax.Array) -> jax.Array:
        """[Z, D] -> [N, T, D], each expert's rows starting a fresh tile, zeros between."""
        rows = jnp.take(_with_zero_row(x_ZD), self.src_S, axis=0)
        return rows.reshape(self.N, self.T, x_ZD.shape[-1])

    def unpad(self, y_NTF: jax.Array) -> jax.Array:
        return jnp.take(_with_zero_row(y_NTF.reshape(self.N * self.T, -1)), self.dest_Z, axis=0)


def _bucket(ends_E: jax.Array, q: jax.Array) -> jax.Array:
    """How many of the sorted `ends_E` are <= each q (searchsorted side="right"). Compare-all
    over the few experts: jnp.searchsorted (jax 0.10.2) fails inside shard_map's manual axes."""
    return jnp.sum(q[:, None] >= ends_E[None, :], axis=1, dtype=jnp.int32)


def _varying_as(z: jax.Array, *operands: jax.Array) -> jax.Array:
    """`z` typed as varying over every manual mesh axis any operand varies over: inside
    shard_map, both branches of a cond (and a scan's carry) must agree on that type."""
    axes = frozenset().union(*map(_varying, operands))
    return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _sum_to(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """The cotangent of `primal` from one that varies over more manual axes: summed over them.
    (A weight invariant over `data` met rows varying over it; autodiff would insert this psum.)"""
    extra = _varying(ct) - _varying(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _varying(x: jax.Array) -> frozenset:
    return jax.typeof(x).manual_axis_type.varying


def _with_zero_row(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])


def _per_tile(x_NTD, w_EDF, layout: _Layout, *, transpose_w: bool):
    """out[t] = x[t] @ w[expert of t] (or @ w[...]^T), tiles past `used` left zero."""
    N, T, _ = x_NTD.shape
    F = w_EDF.shape[1 if transpose_w else 2]
    contract = ((1,), (1 if transpose_w else 0,))

    def body(_, xs):
        t, x_TD, e = xs

        def compute():
            w_DF = jax.lax.dynamic_index_in_dim(w_EDF, e, 0, keepdims=False)
            return jax.lax.dot_general(x_TD, w_DF, (contract, ((), ())))

        zeros = lambda: _varying_as(jnp.zeros((T, F), x_TD.dtype), x_TD, w_EDF)  # noqa: E731
        return None, jax.lax.cond(t < layout.used, compute, zeros)

    tiles = jnp.arange(N, dtype=jnp.int32)
    return jax.lax.scan(body, None, (tiles, x_NTD, layout.expert_N))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x_ZD, w_EDF, group_sizes_E, T):
    return _tiled_fwd(x_ZD, w_EDF, group_sizes_E, T)[0]


def _tiled_fwd(x_ZD, w_EDF, group_sizes_E, T):
    layout = _Layout(group_sizes_E, x_ZD.shape[0], T)
    y_NTF = _per_tile(layout.pad(x_ZD), w_EDF, layout, transpose_w=False)
    return layout.unpad(y_NTF), (x_ZD, w_EDF, group_sizes_E)


def _tiled_bwd(T, residuals, dy_ZF):
    x_ZD, w_EDF, group_sizes_E = residuals
    layout = _Layout(group_sizes_E, x_ZD.shape[0], T)
    x_NTD, dy_NTF = layout.pad(x_ZD), layout.pad(dy_ZF.astype(x_ZD.dtype))
    dx_ZD = layout.unpad(_per_tile(dy_NTF, w_EDF, layout, transpose_w=True)).astype(x_ZD.dtype)
    acc = jnp.promote_types(w_EDF.dtype, jnp.float32)

    def body(dw_EDF, xs):
        t, x_TD, dy_TF, e = xs

        def add(dw_EDF):
            dw_DF = jax.lax.dot_general(
                x_TD, dy_TF, (((0,), (0,)), ((), ())), preferred_element_type=acc
            )
            cur = jax.lax.dynamic_index_in_dim(dw_EDF, e, 0, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(dw_EDF, cur + dw_DF, e, 0)

        return jax.lax.cond(t < layout.used, add, lambda dw: dw, dw_EDF), None

    tiles = jnp.arange(layout.N, dtype=jnp.int32)
    dw0_EDF = _varying_as(jnp.zeros(w_EDF.shape, acc), x_NTD, dy_NTF, w_EDF)
    dw_EDF = jax.lax.scan(body, dw0_EDF, (tiles, x_NTD, dy_NTF, layout.expert_N))[0]
    return _sum_to(dx_ZD, x_ZD), _sum_to(dw_EDF, w_EDF).astype(w_EDF.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
