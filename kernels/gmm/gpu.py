"""Grouped matmul (MoE experts) for NVIDIA GPUs: Pallas kernels lowered through Triton.

gmm:  out[rows of g] = lhs[rows of g] @ rhs[g], rows sorted by group, group sizes known only at run time.
tgmm: out[g] = lhs[rows of g].T @ grad[rows of g], the weight gradient.

The Triton backend of Pallas has no scalar prefetch, so the work list is built in jnp before the launch and read
inside the kernel from an int32 array by program id. gmm walks "visits": row tile t of group g. A tile that
straddles a group boundary is visited once per group, each visit storing only its own rows, so no two programs
write the same element and no accumulation across programs is needed. A pseudo group after the last real one
covers the rows past sum(group_sizes) and writes their zeros (the semantics of jax.lax.ragged_dot). There are
at most M / tm + G visits, a static bound, so the grid is static; spare visits store nothing.

Legend: M rows (tokens x top-k), K contraction dim, N output dim, G groups (experts).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["GmmTiling", "TgmmTiling", "gmm_gpu", "tgmm_gpu"]


def _check_fields(obj):
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        name = f"{type(obj).__name__}.{field.name}"
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if field.name in ("tm", "tk", "tn") and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles), got {value}.")
        if field.name == "num_warps" and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"{name} must be one of 1, 2, 4, 8, 16, got {value}.")


@dataclasses.dataclass(frozen=True)
class GmmTiling:
    """gmm tiles: tm rows x tn columns per program, tk deep per step; group_m row tiles share a column band
    (consecutive programs reuse one rhs slab and one lhs tile from L2). Defaults tuned on an H100, bf16."""

    tm: int = 128
    tk: int = 64
    tn: int = 256
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8

    def __post_init__(self):
        _check_fields(self)


@dataclasses.dataclass(frozen=True)
class TgmmTiling:
    """tgmm tiles: a tk x tn block of one group's [K, N] gradient per program, tm rows per step. Defaults tuned on
    an H100 at DeepSeek-V3 expert shapes, bf16 (short row steps waste less on the ragged ends of small groups)."""

    tm: int = 32
    tk: int = 128
    tn: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        _check_fields(self)


def _dot(a, b, **kw):
    # float32 operands get IEEE products (tf32 costs ~1e-3 relative error); bf16 takes the tensor-core path.
    return plgpu.dot(a, b, precision=lax.Precision.HIGHEST if a.dtype == jnp.float32 else None, **kw)


def _tile(requested: int, dim: int) -> int:
    """The requested tile, shrunk (to no less than 16) while it is more than the dimension needs."""
    while requested > 16 and requested // 2 >= dim:
        requested //= 2
    return requested


def _bounds(group_sizes, m: int):
    """starts, ends [G] of each group's rows, clipped to the m rows that exist."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]]), ends


def _schedule(group_sizes, m: int, tm: int):
    """int32 [4, M/tm + G]: per visit (group, row tile, first row, end row); group G is the zero-filled tail."""
    G = group_sizes.shape[0]
    starts, ends = _bounds(group_sizes, m)
    starts = jnp.append(starts, ends[-1])
    ends = jnp.append(ends, m)
    first_tile = starts // tm
    tiles = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, 0)
    stop = jnp.cumsum(tiles)
    visit = jnp.arange(m // tm + G, dtype=jnp.int32)
    group = jnp.searchsorted(stop, visit, side="right").astype(jnp.int32)
    used = group <= G
    group = jnp.minimum(group, G)
    tile = first_tile[group] + visit - (stop[group] - tiles[group])
    lo = jnp.maximum(starts[group], tile * tm)
    hi = jnp.minimum(ends[group], tile * tm + tm)
    tile, lo, hi = (jnp.where(used, x, 0) for x in (tile, lo, hi))
    return jnp.stack([group, tile, lo, hi]).astype(jnp.int32)


def _gmm_kernel(sched_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, num_visits, num_n, group_m, transpose_rhs):
    G = rhs_ref.shape[0]
    K = lhs_ref.shape[1]
    N = out_ref.shape[1]
    # Programs run in bands of group_m visits: within a band the column index moves slowest, so the programs
    # resident at one time share an rhs column slab and a handful of lhs tiles in L2.
    pid = pl.program_id(0)
    band_size = group_m * num_n
    first = lax.div(pid, band_size) * group_m
    rows_in_band = jnp.minimum(num_visits - first, group_m)
    within = lax.rem(pid, band_size)
    visit = first + lax.rem(within, rows_in_band)
    col = lax.div(within, rows_in_band)
    group, tile, lo, hi = (sched_ref[i, visit] for i in range(4))
    row0, col0 = tile * tm, col * tn
    # Spare visits and the zero tail skip the K loop. (A multiply, not jnp.where: the Triton lowering turns a
    # select between two Python ints into an i1 and the loop bound then fails to verify.)
    steps = ((group < G) & (hi > lo)).astype(jnp.int32) * pl.cdiv(K, tk)
    g = jnp.minimum(group, G - 1)
    cols = col0 + jnp.arange(tn)
    k_edge, n_edge = K % tk != 0, N % tn != 0

    def step(i, acc):
        ks = i * tk + jnp.arange(tk)
        k_ok = ks < K
        x_ref = lhs_ref.at[pl.ds(row0, tm), pl.ds(i * tk, tk)]
        x = plgpu.load(x_ref, mask=k_ok[None, :], other=0) if k_edge else x_ref[...]
        if transpose_rhs:  # rhs [G, N, K]: the tile is [tn, tk] and Triton transposes it on the way to the MMA
            w_ref = rhs_ref.at[g, pl.ds(col0, tn), pl.ds(i * tk, tk)]
            mask = (cols < N)[:, None] & k_ok[None, :] if k_edge or n_edge else None
        else:
            w_ref = rhs_ref.at[g, pl.ds(i * tk, tk), pl.ds(col0, tn)]
            mask = k_ok[:, None] & (cols < N)[None, :] if k_edge or n_edge else None
        w = w_ref[...] if mask is None else plgpu.load(w_ref, mask=mask, other=0)
        return acc + _dot(x.astype(w.dtype), w, trans_b=transpose_rhs)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((tm, tn), jnp.float32))
    rows = row0 + jnp.arange(tm)
    mask = ((rows >= lo) & (rows < hi))[:, None] & (cols < N)[None, :]
    plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], acc.astype(out_ref.dtype), mask=mask)


def _gmm_call(lhs, rhs, group_sizes, *, out_dtype, tiling, transpose_rhs, interpret):
    M, K = lhs.shape
    G = rhs.shape[0]
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _tile(tiling.tm, M), _tile(tiling.tk, K), _tile(tiling.tn, N)
    M_padded = pl.cdiv(M, tm) * tm  # padded rows belong to the zero tail; sliced off below
    if M_padded != M:
        lhs = jnp.pad(lhs, ((0, M_padded - M), (0, 0)))
    sched = _schedule(group_sizes, M_padded, tm)
    num_visits, num_n = sched.shape[1], pl.cdiv(N, tn)
    kernel = functools.partial(
        _gmm_kernel,
        tm=tm,
        tk=tk,
        tn=tn,
        num_visits=num_visits,
        num_n=num_n,
        group_m=min(tiling.group_m, num_visits),
        transpose_rhs=transpose_rhs,
    )
    itemsize = jnp.dtype(lhs.dtype).itemsize
    out = pl.pallas_call(
        kernel,
        grid=(num_visits * num_n,),
        out_shape=jax.ShapeDtypeStruct((M_padded, N), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * M * K * N,
            transcendentals=0,
            bytes_accessed=(M * K + G * K * N) * itemsize + M * N * jnp.dtype(out_dtype).itemsize,
        ),
        interpret=interpret,
        name="gmm_gpu",
    )(sched, lhs, rhs)
    return out[:M]


def _tgmm_kernel(bounds_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn):
    K, N = lhs_ref.shape[1], grad_ref.shape[1]
    # Group slowest (grid axis 2): the programs of one group run together and re-read its rows from L2.
    k0, n0, g = pl.program_id(0) * tk, pl.program_id(1) * tn, pl.program_id(2)
    start, end = bounds_ref[0, g], bounds_ref[1, g]
    ks, ns = k0 + jnp.arange(tk), n0 + jnp.arange(tn)

    def step(i, acc):
        r0 = start + i * tm
        row_ok = (r0 + jnp.arange(tm)) < end  # the first and last tiles of a group are ragged
        x = plgpu.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)], mask=row_ok[:, None] & (ks < K)[None, :], other=0)
        y = plgpu.load(grad_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)], mask=row_ok[:, None] & (ns < N)[None, :], other=0)
        return acc + _dot(x, y.astype(x.dtype), trans_a=True)

    acc = lax.fori_loop(0, lax.div(end - start + tm - 1, tm), step, jnp.zeros((tk, tn), jnp.float32))
    mask = (ks < K)[:, None] & (ns < N)[None, :]
    plgpu.store(out_ref.at[g, pl.ds(k0, tk), pl.ds(n0, tn)], acc.astype(out_ref.dtype), mask=mask)


def tgmm_gpu(
    lhs_MxK: jax.Array,
    grad_MxN: jax.Array,
    group_sizes_G: jax.Array,
    num_groups: int,
    *,
    preferred_element_type=None,
    tiling: TgmmTiling | None = None,
    interpret: bool = False,
) -> jax.Array:
    """out [G, K, N]: out[g] = lhs[rows of g].T @ grad[rows of g]; empty groups give zeros."""
    if group_sizes_G.shape != (num_groups,):
        raise ValueError(f"group_sizes_G must have shape ({num_groups},), got {group_sizes_G.shape}.")
    tiling = TgmmTiling() if tiling is None else tiling
    (M, K), N = lhs_MxK.shape, grad_MxN.shape[1]
    tm, tk, tn = _tile(tiling.tm, M), _tile(tiling.tk, K), _tile(tiling.tn, N)
    out_dtype = preferred_element_type or lhs_MxK.dtype
    bounds = jnp.stack(_bounds(group_sizes_G, M))
    itemsize = jnp.dtype(lhs_MxK.dtype).itemsize
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
        grid=(pl.cdiv(K, tk), pl.cdiv(N, tn), num_groups),
        out_shape=jax.ShapeDtypeStruct((num_groups, K, N), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * M * K * N,
            transcendentals=0,
            bytes_accessed=(M * K + M * N) * itemsize + num_groups * K * N * jnp.dtype(out_dtype).itemsize,
        ),
        interpret=interpret,
        name="tgmm_gpu",
    )(bounds, lhs_MxK, grad_MxN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, out_dtype, tiling, tgmm_tiling, interpret):
    return _gmm_call(
        lhs, rhs, group_sizes, out_dtype=out_dtype, tiling=tiling, transpose_rhs=False, interpret=interpret
    )


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, tgmm_tiling, interpret):
    return _gmm(lhs, rhs, group_sizes, out_dtype, tiling, tgmm_tiling, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, tgmm_tiling, interpret, residuals, grad):
    lhs, rhs, group_sizes = residuals
    # The backward products run in the operands' dtype (bf16 on the fast path) with float32 accumulation.
    grad = grad.astype(lhs.dtype)
    dlhs = _gmm_call(
        grad, rhs, group_sizes, out_dtype=lhs.dtype, tiling=tiling, transpose_rhs=True, interpret=interpret
    )
    drhs = tgmm_gpu(
        lhs,
        grad,
        group_sizes,
        rhs.shape[0],
        preferred_element_type=rhs.dtype,
        tiling=tgmm_tiling,
        interpret=interpret,
    )
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_gpu(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    preferred_element_type=None,
    interpret: bool = False,
    tiling: GmmTiling | None = None,
    tgmm_tiling: TgmmTiling | None = None,
) -> jax.Array:
    """out [M, N]: rows of group g times rhs[g]; rows past sum(group_sizes) are zeros. Differentiable in lhs and
    rhs (dlhs by this kernel on rhs read transposed, drhs by tgmm_gpu); group_sizes gets no gradient."""
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs_MxK.dtype, rhs_GxKxN.dtype))
    tiling = GmmTiling() if tiling is None else tiling
    tgmm_tiling = TgmmTiling() if tgmm_tiling is None else tgmm_tiling
    return _gmm(lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32), out_dtype, tiling, tgmm_tiling, bool(interpret))
