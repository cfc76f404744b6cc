"""Grouped matmul for the MoE as Pallas TPU (Mosaic) kernels: `gmm` (forward, custom_vjp) and `tgmm`.

Shapes: M rows (tokens sorted by expert), K contraction, N output, G groups (experts). Group g owns the rows
[start_g, start_g + group_sizes[g]) of the row-sorted operand; rows past sum(group_sizes) belong to nobody.

    gmm:  out_MxN[rows of g]  = lhs_MxK[rows of g] @ rhs_GxKxN[g]        (rows of nobody give zeros)
    tgmm: out_GxKxN[g]        = lhs_MxK[rows of g].T @ grad_MxN[rows of g]  (empty groups give zeros)

Group sizes are only known at run time, so the kernels cannot be gridded over groups. Instead a small jnp
"schedule" is computed first: one entry per grid step saying which (group, m-tile) pair that step works on.
An m-tile that straddles a group boundary is visited once per group it touches, and each visit only keeps the
rows of its own group (a row range [row_lo, row_hi) inside the tile). The schedule reaches the kernel through
scalar prefetch (SMEM), so the BlockSpec index maps can pick rhs[group] and the right m-tile before each step's
DMA is issued. Steps are ordered by group and then by tile, which makes tile ids non-decreasing: an output
block is revisited only on consecutive steps, the precondition for Pallas keeping it resident in VMEM.

The functions here expect padded shapes (M, K, N multiples of the tile sizes); the wrapper in __init__.py
validates user input, pads and picks tile sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["Tiling", "gmm", "make_schedule", "tgmm"]


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes for the m (rows), k (contraction) and n (output) dimensions.

    tm must be a multiple of 8 (16 for 2-byte dtypes, checked by the wrapper, which knows the dtype) and tk, tn
    multiples of 128, the TPU's (sublane, lane) layout. A dimension smaller than its tile uses the whole
    dimension as one block instead (always a legal block shape).

    The default suits the DeepSeek-V3 expert shapes: tm=128 keeps the work wasted on tiles that straddle
    group boundaries small when experts see ~100s of tokens, and the blocks (double-buffered lhs 128x512,
    rhs 512x1024, out 128x1024 plus a fp32 accumulator; tgmm: a 512x1024 fp32 accumulator and output) use
    3-5 MiB in bf16, inside every generation's default scoped VMEM (16 MiB on v5e).
    """

    tm: int = 128
    tk: int = 512
    tn: int = 1024

    def __post_init__(self):
        for name, multiple in (("tm", 8), ("tk", 128), ("tn", 128)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"Tiling.{name} must be a positive multiple of {multiple}, got {value!r}.")


class Schedule(NamedTuple):
    """The work list (int32 arrays, scalar-prefetched into SMEM, so kept to two per step plus two per group).

    owner: per step, the entry the step works for: a group in [0, G), or G for gmm's tail of rows no group owns.
        Steps past num_steps hold G + 1 (the arrays have max_steps + 1 entries, one spare, so a step can look
        at its successor). Weights (gmm) and output blocks (tgmm) are those of group min(owner, G - 1).
    tile: per step, the m-tile the step reads (and, for gmm, writes).
    starts, ends: per entry (G groups, then the tail as the empty range [total, total)), its rows [start, end).
    num_steps: scalar, how many steps the grid runs (a dynamic grid size).
    """

    owner: jax.Array
    tile: jax.Array
    starts: jax.Array
    ends: jax.Array
    num_steps: jax.Array


def make_schedule(group_sizes_G: jax.Array, m: int, tm: int, *, visit_empty_groups: bool, cover_tail: bool):
    """Builds the (group, m-tile) work list for m rows (a multiple of tm) split into groups.

    visit_empty_groups: give every empty group one step that computes nothing (tgmm must zero its output).
    cover_tail: give every m-tile past the last group's end one step that computes nothing (gmm must write
    zeros there, since Pallas never writes an output block no step visits).

    Bound on the steps: the non-empty groups cover ceil(total / tm) tiles and each boundary between two of
    them adds at most one revisit, the tail adds the remaining tiles and empty groups add at most one step
    each, so num_steps <= tiles_m + G - 1 (with tiles_m >= 1).
    """
    num_groups = group_sizes_G.shape[0]
    tiles_m = m // tm
    # Clip so that bad sizes (negative, or summing past m) cannot send the kernel outside the array.
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes_G.astype(jnp.int32), 0)), m)
    total = ends[-1]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])  # entry G, the tail, is [total, total)
    ends = jnp.append(ends, total)
    first_tile = starts // tm
    visits = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, int(visit_empty_groups))
    first_tile = first_tile.at[num_groups].set((total + tm - 1) // tm)  # the first tile no group touches
    visits = visits.at[num_groups].set(tiles_m - first_tile[num_groups] if cover_tail else 0)
    visits_end = jnp.cumsum(visits)  # inclusive: entry e owns steps [visits_end[e] - visits[e], visits_end[e])

    max_steps = tiles_m + num_groups - 1
    step = jnp.arange(max_steps + 1, dtype=jnp.int32)
    # owner = number of entries that end at or before this step; a [steps, entries] comparison is tiny.
    owner = jnp.sum(visits_end[None, :] <= step[:, None], axis=1, dtype=jnp.int32)
    entry = jnp.minimum(owner, num_groups)
    tile = first_tile[entry] + step - (visits_end - visits)[entry]
    tile = jnp.clip(tile, 0, tiles_m - 1)  # empty groups after the last row and steps past num_steps
    return Schedule(owner=owner, tile=tile, starts=starts, ends=ends, num_steps=visits_end[-1])


def _step_rows(step, owner, tile, starts, ends, tm):
    """The rows [lo, hi) of the step's tile that belong to its entry; lo == hi for the tail and empty groups."""
    entry, row0 = owner[step], tile[step] * tm
    return jnp.clip(starts[entry] - row0, 0, tm), jnp.clip(ends[entry] - row0, 0, tm)


def _dot(a, b, contract, compute_dtype):
    # bf16 runs one native MXU pass; Mosaic rejects a higher precision on it, which a global
    # jax_default_matmul_precision="highest" would otherwise request. fp32 follows that global setting.
    precision = None if jnp.dtype(compute_dtype).itemsize >= 4 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(
        a.astype(compute_dtype),
        b.astype(compute_dtype),
        (contract, ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _rows_mask(shape, row_lo, row_hi):
    rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= row_lo) & (rows < row_hi)


def _gmm_kernel(
    owner, tile, starts, ends, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, tiles_k, transpose_rhs, compute_dtype
):
    step, k_i = pl.program_id(1), pl.program_id(2)
    lo, hi = _step_rows(step, owner, tile, starts, ends, tm)

    @pl.when(k_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # Rows of other groups are computed too (the MXU works on whole tiles) and dropped at the store.
    @pl.when(hi > lo)
    def _accumulate():
        contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
        acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], contract, compute_dtype)

    @pl.when(k_i == tiles_k - 1)
    def _store():
        # The first visit of a tile starts from zeros, not from whatever the VMEM buffer held, so rows that no
        # group owns come out as zeros; later visits keep the rows earlier groups wrote.
        first_visit = (step == 0) | (tile[jnp.maximum(step - 1, 0)] != tile[step])
        previous = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
        mask = _rows_mask(acc_ref.shape, lo, hi)
        out_ref[...] = jnp.where(mask, acc_ref[...], previous).astype(out_ref.dtype)


def gmm_call(lhs_MxK, rhs, group_sizes_G, *, out_dtype, tiles, transpose_rhs=False, interpret=False, cost_rows=None):
    """The forward pallas_call. rhs is [G, K, N], or [G, N, K] with transpose_rhs (d lhs, without copying rhs).
    cost_rows: the rows the declared cost estimate counts as work (default all M)."""
    tm, tk, tn = tiles
    (m, k), num_groups = lhs_MxK.shape, rhs.shape[0]
    rows = m if cost_rows is None else cost_rows
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    assert m % tm == 0 and k % tk == 0 and n % tn == 0, (lhs_MxK.shape, rhs.shape, tiles)
    tiles_k, tiles_n = k // tk, n // tn
    schedule = make_schedule(group_sizes_G, m, tm, visit_empty_groups=False, cover_tail=True)

    # Steps without rows (the tail) pin their k block to the last one: consecutive tail steps then ask for the
    # same rhs block and the pipeline skips the DMA, instead of streaming the last group's weights per tail tile.
    def k_block(k_i, step, owner, tile, starts, ends):
        lo, hi = _step_rows(step, owner, tile, starts, ends, tm)
        return jnp.where(hi > lo, k_i, tiles_k - 1)

    def lhs_index(n_i, step, k_i, owner, tile, starts, ends):
        return tile[step], k_block(k_i, step, owner, tile, starts, ends)

    def rhs_index(n_i, step, k_i, owner, tile, starts, ends):
        group = jnp.minimum(owner[step], num_groups - 1)  # the tail reads the last group's weights, uses none
        k_b = k_block(k_i, step, owner, tile, starts, ends)
        return (group, n_i, k_b) if transpose_rhs else (group, k_b, n_i)

    def out_index(n_i, step, k_i, owner, tile, starts, ends):
        return tile[step], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    out_itemsize = jnp.dtype(out_dtype).itemsize
    # lhs is streamed once per n-tile; rhs[g] once per step, and there are at most tiles_m + G - 1 steps. Tail
    # tiles (rows in no group) read one lhs block and no new rhs block, and write zeros: only `rows` do work.
    bytes_accessed = (
        rows * k * lhs_MxK.dtype.itemsize * tiles_n
        + (-(-rows // tm) + num_groups - 1) * k * n * rhs.dtype.itemsize
        + m * n * out_itemsize
    )
    kernel = functools.partial(
        _gmm_kernel,
        tm=tm,
        tiles_k=tiles_k,
        transpose_rhs=transpose_rhs,
        compute_dtype=jnp.result_type(lhs_MxK.dtype, rhs.dtype),
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_n, schedule.num_steps, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec(rhs_block, rhs_index)],
            out_specs=pl.BlockSpec((tm, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # Steps revisit output tiles (a tile shared by two groups), so only the n axis may be split over cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * rows * k * n, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="gmm_transposed_rhs" if transpose_rhs else "gmm",
    )
    return call(*schedule[:4], lhs_MxK, rhs)


def _tgmm_kernel(owner, tile, starts, ends, lhs_ref, grad_ref, out_ref, acc_ref, *, tm, compute_dtype):
    step = pl.program_id(2)
    lo, hi = _step_rows(step, owner, tile, starts, ends, tm)
    this = owner[step]

    @pl.when((step == 0) | (owner[jnp.maximum(step - 1, 0)] != this))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi > lo)
    def _accumulate():
        # Both operands are masked (with a select, not a multiply) so that rows of other groups cannot leak in,
        # even when they hold inf/nan.
        lhs = jnp.where(_rows_mask(lhs_ref.shape, lo, hi), lhs_ref[...], 0)
        grad = jnp.where(_rows_mask(grad_ref.shape, lo, hi), grad_ref[...], 0)
        acc_ref[...] += _dot(lhs, grad, ((0,), (0,)), compute_dtype)

    # The schedule has one spare step past the last whose owner differs from every group.
    @pl.when(owner[step + 1] != this)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_MxK, grad_MxN, group_sizes_G, *, num_groups, out_dtype, tiles, interpret=False, cost_rows=None):
    """The weight-gradient pallas_call: out_GxKxN[g] = lhs[rows of g].T @ grad[rows of g]. cost_rows: as gmm_call."""
    tm, tk, tn = tiles
    (m, k), n = lhs_MxK.shape, grad_MxN.shape[1]
    rows = m if cost_rows is None else cost_rows
    assert m % tm == 0 and k % tk == 0 and n % tn == 0, (lhs_MxK.shape, grad_MxN.shape, tiles)
    tiles_k, tiles_n = k // tk, n // tn
    schedule = make_schedule(group_sizes_G, m, tm, visit_empty_groups=True, cover_tail=False)

    def lhs_index(n_i, k_i, step, owner, tile, starts, ends):
        return tile[step], k_i

    def grad_index(n_i, k_i, step, owner, tile, starts, ends):
        return tile[step], n_i

    def out_index(n_i, k_i, step, owner, tile, starts, ends):
        return owner[step], k_i, n_i  # tgmm has no tail, so every executed step's owner is a group

    out_itemsize = jnp.dtype(out_dtype).itemsize
    bytes_accessed = (  # no tail steps: only the rows in groups are read
        rows * k * lhs_MxK.dtype.itemsize * tiles_n
        + rows * n * grad_MxN.dtype.itemsize * tiles_k
        + num_groups * k * n * out_itemsize
    )
    kernel = functools.partial(_tgmm_kernel, tm=tm, compute_dtype=jnp.result_type(lhs_MxK.dtype, grad_MxN.dtype))
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_n, tiles_k, schedule.num_steps),
            in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec((tm, tn), grad_index)],
            out_specs=pl.BlockSpec((None, tk, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        # Each (n, k) output tile is independent; the steps accumulate into it, so they stay sequential.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * rows * k * n, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="tgmm",
    )
    return call(*schedule[:4], lhs_MxK, grad_MxN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype, tiles, interpret, cost_rows=None):
    """Differentiable grouped matmul on padded shapes; tiles = (tm, tk, tn) dividing (M, K, N). cost_rows: the
    rows the cost estimates of the forward and backward calls count as work (default all)."""
    return gmm_call(
        lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype=out_dtype, tiles=tiles, interpret=interpret, cost_rows=cost_rows
    )


def _gmm_fwd(lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype, tiles, interpret, cost_rows):
    out = gmm_call(
        lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype=out_dtype, tiles=tiles, interpret=interpret, cost_rows=cost_rows
    )
    return out, (lhs_MxK, rhs_GxKxN, group_sizes_G)


def _gmm_bwd(out_dtype, tiles, interpret, cost_rows, residuals, grad_MxN):
    lhs_MxK, rhs_GxKxN, group_sizes_G = residuals
    tm, tk, tn = tiles
    # d lhs contracts over N and produces K: swapping tk and tn keeps rhs blocks the same [tk, tn] shape.
    dlhs_MxK = gmm_call(
        grad_MxN,
        rhs_GxKxN,
        group_sizes_G,
        out_dtype=lhs_MxK.dtype,
        tiles=(tm, tn, tk),
        transpose_rhs=True,
        interpret=interpret,
        cost_rows=cost_rows,
    )
    drhs_GxKxN = tgmm(
        lhs_MxK,
        grad_MxN,
        group_sizes_G,
        num_groups=rhs_GxKxN.shape[0],
        out_dtype=rhs_GxKxN.dtype,
        tiles=tiles,
        interpret=interpret,
        cost_rows=cost_rows,
    )
    return dlhs_MxK, drhs_GxKxN, None  # group sizes are integers: no cotangent


gmm.defvjp(_gmm_fwd, _gmm_bwd)
