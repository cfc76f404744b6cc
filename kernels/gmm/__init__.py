"""Grouped matmul for the MoE's dropless dispatch: `gmm` (tokens sorted by expert x per-expert weights) and
`tgmm` (its weight gradient), with group sizes known only at run time.

    from openr1_jax_kernels.gmm import gmm, tgmm, Tiling
    out_MxN = gmm(lhs_MxK, rhs_GxKxN, group_sizes_G)                  # differentiable in lhs and rhs
    drhs_GxKxN = tgmm(lhs_MxK, grad_MxN, group_sizes_G, num_groups=G)

Group g owns rows [start_g, start_g + group_sizes[g]) of the row-sorted operand, start_g = sum of the sizes
before it. Empty groups are allowed; rows past sum(group_sizes) belong to no group and give zero output rows
(the semantics of jax.lax.ragged_dot). Sizes summing past M are clipped at M.

Backends (`implementation`): "tpu" the Pallas TPU kernels (tpu.py), "gpu" the Pallas GPU kernel (gpu.py, falling
back to XLA where it is missing), "xla" jax.lax.ragged_dot (reference.py), "auto" the one for the platform being
compiled for. `interpret=True` runs the Pallas kernel in the interpreter on CPU ("auto" then means "tpu").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import tpu
from .reference import gmm_reference, tgmm_reference
from .tpu import Tiling

__all__ = ["IMPLEMENTATIONS", "Tiling", "gmm", "gmm_reference", "tgmm", "tgmm_reference"]

IMPLEMENTATIONS = ("auto", "tpu", "gpu", "xla")
_LANE = 128  # tk and tn shrink in multiples of this so blocks stay lane-aligned
_GPU_ROW_MULTIPLE = 128  # gpu.py's contract: M arrives padded to a multiple of this


def gmm(
    lhs_MxK,
    rhs_GxKxN,
    group_sizes_G,
    *,
    preferred_element_type=None,
    tiling: Tiling | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    cost_rows: int | None = None,
):
    """out_MxN[rows of g] = lhs_MxK[rows of g] @ rhs_GxKxN[g], accumulated in float32.

    preferred_element_type: output dtype (default: the promoted input dtype). tiling: maximum (tm, tk, tn) for the
    TPU kernel (default Tiling()); tk and tn shrink to a multiple of 128 dividing K and N where one exists and the
    operands are zero-padded otherwise. Gradients flow to lhs and rhs (d lhs = gmm with rhs transposed, d rhs =
    tgmm); group_sizes gets none.
    cost_rows: how many rows the caller expects to fall in a group (default M), for the cost estimate the TPU
    kernels declare to XLA (forward and backward). The kernels skip the rows past sum(group_sizes), so a caller
    whose buffer is mostly such a tail (expert parallelism: a device's groups get about M / ep of the rows) says
    so, and XLA's cost analysis counts the work done rather than the buffer.
    """
    _check_backend(implementation, interpret)
    _check_float("lhs_MxK", lhs_MxK, 2, "[M, K]")
    _check_float("rhs_GxKxN", rhs_GxKxN, 3, "[G, K, N]")
    (m, k), (num_groups, rhs_k, n) = lhs_MxK.shape, rhs_GxKxN.shape
    if rhs_k != k:
        raise ValueError(f"rhs_GxKxN has K={rhs_k} but lhs_MxK has K={k}; the contraction sizes must match.")
    if num_groups < 1:
        raise ValueError("rhs_GxKxN must hold at least one group (G >= 1), got G=0.")
    _check_group_sizes(group_sizes_G, num_groups, "rhs_GxKxN.shape[0]")
    out_dtype = _out_dtype(preferred_element_type, lhs_MxK.dtype, rhs_GxKxN.dtype)
    tiles = _fit_tiles(tiling, m, k, n, (lhs_MxK.dtype, rhs_GxKxN.dtype, out_dtype))
    if cost_rows is None:
        cost_rows = m
    if isinstance(cost_rows, bool) or not isinstance(cost_rows, int | np.integer) or not 0 <= cost_rows <= m:
        raise ValueError(f"cost_rows must be a Python int in [0, M={m}], got {cost_rows!r}.")
    return _gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype, tiles, implementation, interpret, int(cost_rows))


def tgmm(
    lhs_MxK,
    grad_MxN,
    group_sizes_G,
    *,
    num_groups: int,
    preferred_element_type=None,
    tiling: Tiling | None = None,
    implementation: str = "auto",
    interpret: bool = False,
):
    """out_GxKxN[g] = lhs_MxK[rows of g].T @ grad_MxN[rows of g] (zeros for empty groups), accumulated in float32.

    This is gmm's weight gradient; it has no gradient of its own. num_groups (static) must equal G.
    """
    _check_backend(implementation, interpret)
    _check_float("lhs_MxK", lhs_MxK, 2, "[M, K]")
    _check_float("grad_MxN", grad_MxN, 2, "[M, N]")
    (m, k), (grad_m, n) = lhs_MxK.shape, grad_MxN.shape
    if grad_m != m:
        raise ValueError(f"grad_MxN has M={grad_m} rows but lhs_MxK has M={m}; both must hold the same rows.")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive Python int, got {num_groups!r}.")
    _check_group_sizes(group_sizes_G, int(num_groups), "num_groups")
    out_dtype = _out_dtype(preferred_element_type, lhs_MxK.dtype, grad_MxN.dtype)
    tiles = _fit_tiles(tiling, m, k, n, (lhs_MxK.dtype, grad_MxN.dtype, out_dtype))
    return _tgmm(lhs_MxK, grad_MxN, group_sizes_G, int(num_groups), out_dtype, tiles, implementation, interpret)


# ---------------------------------------------------------------------------------------------------- validation


def _check_backend(implementation, interpret):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}.")


def _check_float(name, x, ndim, legend):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != ndim:
        raise ValueError(f"{name} must be a {ndim}-D {legend} array, got shape {shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}.")


def _check_group_sizes(group_sizes_G, num_groups, source):
    shape = getattr(group_sizes_G, "shape", None)
    if shape is None or len(shape) != 1 or shape[0] != num_groups:
        raise ValueError(f"group_sizes_G must be a 1-D array of length G={num_groups} ({source}), got shape {shape}.")
    if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
        raise ValueError(f"group_sizes_G must be an integer (int32) array, got dtype {group_sizes_G.dtype}.")


def _out_dtype(preferred_element_type, *input_dtypes):
    if preferred_element_type is None:
        return jnp.dtype(jnp.result_type(*input_dtypes))
    try:
        dtype = jnp.dtype(preferred_element_type)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"preferred_element_type must be a floating dtype, got {preferred_element_type!r}.")
    return dtype


def _fit_tiles(tiling, m, k, n, dtypes):
    """Tile sizes for these dims: tm shrinks for small M; tk/tn become the whole dim when it is smaller, else the
    largest multiple of 128 (up to the requested size) that divides it, else the requested size with padding."""
    if tiling is None:
        tiling = Tiling()
    if not isinstance(tiling, Tiling):
        raise ValueError(f"tiling must be a gmm.Tiling or None, got {type(tiling).__name__}.")
    # 2-byte dtypes pack two rows per sublane, so row blocks of the narrowest operand need a multiple of 16.
    narrowest = min((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)
    sublanes = 8 * max(1, 4 // narrowest.itemsize)
    if tiling.tm % sublanes:
        raise ValueError(f"Tiling.tm must be a multiple of {sublanes} for {narrowest.name}, got {tiling.tm}.")

    def fit(dim, tile):
        if dim <= tile:
            return dim
        divisors = [t for t in range(tile, 0, -_LANE) if dim % t == 0]
        return divisors[0] if divisors else tile

    return min(tiling.tm, _round_up(max(m, 1), sublanes)), fit(k, tiling.tk), fit(n, tiling.tn)


# ------------------------------------------------------------------------------------------------------ dispatch


def _round_up(x, multiple):
    return math.ceil(x / multiple) * multiple


def _pad(x, shape):
    widths = [(0, target - size) for size, target in zip(x.shape, shape)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _load_gpu(name):
    try:
        from . import gpu
    except ImportError:  # gpu.py not there yet, or no Triton support in this jax
        return None
    return getattr(gpu, name, None)


def _dispatch(implementation, interpret, operands, *, tpu_fn, gpu_fn, xla_fn):
    if implementation == "xla":
        return xla_fn(*operands)
    if implementation == "tpu" or (implementation == "auto" and interpret):
        return tpu_fn(*operands)
    if implementation == "gpu":
        return gpu_fn(*operands)
    # platform_dependent lowers only the branch of the platform being compiled for, so a TPU AOT compile on a
    # CPU host gets the Mosaic kernel and a CPU run gets XLA.
    return jax.lax.platform_dependent(*operands, tpu=tpu_fn, cuda=gpu_fn, default=xla_fn)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype, tiles, implementation, interpret, cost_rows):
    (m, k), (num_groups, _, n) = lhs_MxK.shape, rhs_GxKxN.shape
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    xla_fn = functools.partial(gmm_reference, preferred_element_type=out_dtype)

    def tpu_fn(lhs_MxK, rhs_GxKxN, group_sizes_G):
        tm, tk, tn = tiles
        padded_k, padded_n = _round_up(k, tk), _round_up(n, tn)
        lhs_MxK = _pad(lhs_MxK, (_round_up(m, tm), padded_k))
        rhs_GxKxN = _pad(rhs_GxKxN, (num_groups, padded_k, padded_n))
        out_MxN = tpu.gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, out_dtype, tiles, interpret, cost_rows)
        return out_MxN[:m, :n]

    def gpu_fn(lhs_MxK, rhs_GxKxN, group_sizes_G):
        gmm_gpu = _load_gpu("gmm_gpu")
        if gmm_gpu is None:
            return xla_fn(lhs_MxK, rhs_GxKxN, group_sizes_G)
        lhs_MxK = _pad(lhs_MxK, (_round_up(m, _GPU_ROW_MULTIPLE), k))
        out_MxN = gmm_gpu(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type=out_dtype, interpret=interpret)
        return out_MxN[:m]

    operands = (lhs_MxK, rhs_GxKxN, group_sizes_G)
    return _dispatch(implementation, interpret, operands, tpu_fn=tpu_fn, gpu_fn=gpu_fn, xla_fn=xla_fn)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _tgmm(lhs_MxK, grad_MxN, group_sizes_G, num_groups, out_dtype, tiles, implementation, interpret):
    (m, k), n = lhs_MxK.shape, grad_MxN.shape[1]
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    xla_fn = functools.partial(tgmm_reference, num_groups=num_groups, preferred_element_type=out_dtype)

    def tpu_fn(lhs_MxK, grad_MxN, group_sizes_G):
        tm, tk, tn = tiles
        padded_m = _round_up(m, tm)
        lhs_MxK = _pad(lhs_MxK, (padded_m, _round_up(k, tk)))
        grad_MxN = _pad(grad_MxN, (padded_m, _round_up(n, tn)))
        out_GxKxN = tpu.tgmm(
            lhs_MxK,
            grad_MxN,
            group_sizes_G,
            num_groups=num_groups,
            out_dtype=out_dtype,
            tiles=tiles,
            interpret=interpret,
        )
        return out_GxKxN[:, :k, :n]

    def gpu_fn(lhs_MxK, grad_MxN, group_sizes_G):
        tgmm_gpu = _load_gpu("tgmm_gpu")
        if tgmm_gpu is None:
            return xla_fn(lhs_MxK, grad_MxN, group_sizes_G)
        padded_m = _round_up(m, _GPU_ROW_MULTIPLE)
        return tgmm_gpu(
            _pad(lhs_MxK, (padded_m, k)),
            _pad(grad_MxN, (padded_m, n)),
            group_sizes_G,
            num_groups=num_groups,
            preferred_element_type=out_dtype,
            interpret=interpret,
        )

    operands = (lhs_MxK, grad_MxN, group_sizes_G)
    return _dispatch(implementation, interpret, operands, tpu_fn=tpu_fn, gpu_fn=gpu_fn, xla_fn=xla_fn)
