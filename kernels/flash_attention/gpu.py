"""Flash attention for NVIDIA GPUs: Pallas kernels lowered through Triton (flash-attention-2 layout).

Three pallas_calls: the forward (one program per query block and head, streaming key blocks with an online
softmax, saving the log-sum-exp), and two backward kernels that never race: dq (one program per query block,
streaming keys) and dk/dv (one program per key block and kv head, streaming the queries of all G query heads
that share the kv head, so the GQA sum happens in registers instead of in an extra [B, T, N, H] buffer).

Layout [B, T, N, H] as the model holds it; T must be a multiple of 128 (the wrapper pads). Legend: B batch,
T time, N query heads, M kv heads (N = M * G), H q/k head dim, O v head dim.

Triton tensors need power-of-two shapes, but MLA's H = 192 is not one. Padding it to 256 would waste a quarter
of the q.k FLOPs, so head dims are split into power-of-two pieces (192 = 128 + 64) and q.k is a sum of dots.
Scores are kept in base 2 (scaled by log2(e)) so the softmax uses exp2, which is one instruction on the GPU;
the saved log-sum-exp is base 2 as well and never leaves this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["BlockSizes", "flash_attention_gpu"]

_LOG2E = math.log2(math.e)
# Finite, so a row whose first key blocks are all masked computes exp2(0) = 1 garbage that the first visible
# key wipes out (its correction factor underflows to exactly 0) instead of the NaN of (-inf) - (-inf).
_MASKED = -1e30


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters. Defaults: the fastest of a sweep on an H100 at T=8k, MLA heads
    (H=192, O=128), bf16 (bench/kernels.py --tune); the best three backward candidates were within 1%."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"BlockSizes.{field.name} must be an int, got {value!r}.")
            if field.name.startswith("block") and not (_pow2(value) and value >= 16):
                raise ValueError(f"BlockSizes.{field.name} must be a power of two >= 16 (Triton tiles), got {value}.")
            if field.name.startswith("num_warps") and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"BlockSizes.{field.name} must be one of 1, 2, 4, 8, 16, got {value}.")
            if field.name.startswith("num_stages") and value < 1:
                raise ValueError(f"BlockSizes.{field.name} must be >= 1, got {value}.")


def _pieces(dim: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) power-of-two pieces of a head dim, largest first: 192 -> ((0, 128), (128, 64))."""
    pieces, offset = [], 0
    while offset < dim:
        size = 1 << ((dim - offset).bit_length() - 1)
        pieces.append((offset, size))
        offset += size
    return tuple(pieces)


def _fit(block: int, length: int) -> int:
    """The block itself if it divides the length, else the largest power of two below it that does."""
    while length % block:
        block //= 2
    return block


def _dot(a, b, *, trans_a=False, trans_b=False):
    # float32 inputs get IEEE products (tf32 would cost ~1e-3 relative error); bf16 takes the tensor-core path.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _load_pieces(ref, rows, pieces, *lead):
    return [ref[(rows, *lead, pl.ds(off, size))] for off, size in pieces]


def _sum_dots(xs, ys):
    """sum_i xs[i] @ ys[i].T: one product contracted over a head dim that was loaded in pieces."""
    total = None
    for x, y in zip(xs, ys):
        part = _dot(x, y, trans_b=True)
        total = part if total is None else total + part
    return total


def _mask(rows_idx, cols_idx, rows_seg, cols_seg, *, causal_here, keys_on_rows=False):
    """True where the (row, col) score is visible; None when every score is (no segments, off-diagonal)."""
    visible = None
    if rows_seg is not None:
        visible = rows_seg[:, None] == cols_seg[None, :]
    if causal_here:
        q_idx, k_idx = (
            (cols_idx[None, :], rows_idx[:, None]) if keys_on_rows else (rows_idx[:, None], cols_idx[None, :])
        )
        causal = q_idx >= k_idx
        visible = causal if visible is None else visible & causal
    return visible


def _causal_loops(step, carry, *, causal, start, size, other_block, count, reverse):
    """Runs `step(j, carry, causal_here)` over the other axis's blocks that are not fully masked.

    Forward/dq (reverse=False): this program owns queries [start, start+size); key blocks before start // other
    are fully visible, then a few straddle the diagonal, the rest are skipped. dk/dv (reverse=True): this program
    owns keys; query blocks before start // other are skipped, a few straddle, the rest are fully visible.
    """
    if not causal:
        return lax.fori_loop(0, count, functools.partial(step, causal_here=False), carry)
    first_diag = lax.div(start, other_block)
    end_diag = jnp.minimum(lax.div(start + size + other_block - 1, other_block), count)
    if reverse:
        carry = lax.fori_loop(first_diag, end_diag, functools.partial(step, causal_here=True), carry)
        return lax.fori_loop(end_diag, count, functools.partial(step, causal_here=False), carry)
    carry = lax.fori_loop(0, first_diag, functools.partial(step, causal_here=False), carry)
    return lax.fori_loop(first_diag, end_diag, functools.partial(step, causal_here=True), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, *rest, scale, causal, bq, bk, h_pieces, o_pieces, has_seg):
    seg_ref, o_ref, lse_ref = rest if has_seg else (None, *rest)
    T = k_ref.shape[0]
    # Causal programs get longer with the query index: launch the longest first so the tail is short.
    q_start = (pl.num_programs(0) - 1 - pl.program_id(0)) * bq
    q_idx = q_start + jnp.arange(bq)
    qs = _load_pieces(q_ref, slice(None), h_pieces)
    q_seg = None if seg_ref is None else seg_ref[pl.ds(q_start, bq)]

    def step(j, carry, *, causal_here):
        accs, m_prev, l_prev = carry
        k_rows = pl.ds(j * bk, bk)
        s = _sum_dots(qs, _load_pieces(k_ref, k_rows, h_pieces)) * (scale * _LOG2E)
        k_seg = None if seg_ref is None else seg_ref[k_rows]
        visible = _mask(q_idx, j * bk + jnp.arange(bk), q_seg, k_seg, causal_here=causal_here)
        if visible is not None:
            s = jnp.where(visible, s, _MASKED)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l_prev * correction + jnp.sum(p, axis=1)
        p = p.astype(v_ref.dtype)
        accs = tuple(
            acc * correction[:, None] + _dot(p, v_ref[k_rows, pl.ds(off, size)])
            for acc, (off, size) in zip(accs, o_pieces)
        )
        return accs, m_new, l_new

    init = (
        tuple(jnp.zeros((bq, size), jnp.float32) for _, size in o_pieces),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    accs, m, l = _causal_loops(
        step, init, causal=causal, start=q_start, size=bq, other_block=bk, count=T // bk, reverse=False
    )
    for acc, (off, size) in zip(accs, o_pieces):
        o_ref[:, pl.ds(off, size)] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal, bq, bk, h_pieces, o_pieces, has_seg
):
    seg_ref, dq_ref = rest if has_seg else (None, *rest)
    T = k_ref.shape[0]
    q_start = (pl.num_programs(0) - 1 - pl.program_id(0)) * bq
    q_idx = q_start + jnp.arange(bq)
    qs = _load_pieces(q_ref, slice(None), h_pieces)
    dos = _load_pieces(do_ref, slice(None), o_pieces)
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = None if seg_ref is None else seg_ref[pl.ds(q_start, bq)]

    def step(j, dqs, *, causal_here):
        k_rows = pl.ds(j * bk, bk)
        ks = _load_pieces(k_ref, k_rows, h_pieces)
        s = _sum_dots(qs, ks) * (scale * _LOG2E)
        k_seg = None if seg_ref is None else seg_ref[k_rows]
        visible = _mask(q_idx, j * bk + jnp.arange(bk), q_seg, k_seg, causal_here=causal_here)
        if visible is not None:
            s = jnp.where(visible, s, _MASKED)
        p = jnp.exp2(s - lse[:, None])  # masked scores give exactly 0
        dp = _sum_dots(dos, _load_pieces(v_ref, k_rows, o_pieces))
        ds = (p * (dp - delta[:, None])).astype(k_ref.dtype)
        return tuple(dq + _dot(ds, k) for dq, k in zip(dqs, ks))

    init = tuple(jnp.zeros((bq, size), jnp.float32) for _, size in h_pieces)
    dqs = _causal_loops(step, init, causal=causal, start=q_start, size=bq, other_block=bk, count=T // bk, reverse=False)
    for dq, (off, size) in zip(dqs, h_pieces):
        dq_ref[:, pl.ds(off, size)] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, scale, causal, bq, bk, h_pieces, o_pieces, has_seg
):
    seg_ref, dk_ref, dv_ref = rest if has_seg else (None, *rest)
    T, G = q_ref.shape[0], q_ref.shape[1]
    k_start = pl.program_id(0) * bk
    k_idx = k_start + jnp.arange(bk)
    ks = _load_pieces(k_ref, slice(None), h_pieces)
    vs = _load_pieces(v_ref, slice(None), o_pieces)
    k_seg = None if seg_ref is None else seg_ref[pl.ds(k_start, bk)]

    def per_head(g, carry):
        def step(i, carry, *, causal_here):
            dks, dvs = carry
            q_rows = pl.ds(i * bq, bq)
            # Scores transposed ([keys, queries]) so dk and dv come out of the dots without register transposes.
            qs = _load_pieces(q_ref, q_rows, h_pieces, g)
            s_t = _sum_dots(ks, qs) * (scale * _LOG2E)
            q_seg = None if seg_ref is None else seg_ref[q_rows]
            visible = _mask(k_idx, i * bq + jnp.arange(bq), k_seg, q_seg, causal_here=causal_here, keys_on_rows=True)
            if visible is not None:
                s_t = jnp.where(visible, s_t, _MASKED)
            p_t = jnp.exp2(s_t - lse_ref[g, q_rows][None, :])
            dos = _load_pieces(do_ref, q_rows, o_pieces, g)
            p_lo = p_t.astype(do_ref.dtype)
            dvs = tuple(dv + _dot(p_lo, do) for dv, do in zip(dvs, dos))
            dp_t = _sum_dots(vs, dos)
            ds_t = (p_t * (dp_t - delta_ref[g, q_rows][None, :])).astype(q_ref.dtype)
            dks = tuple(dk + _dot(ds_t, q) for dk, q in zip(dks, qs))
            return dks, dvs

        return _causal_loops(
            step, carry, causal=causal, start=k_start, size=bk, other_block=bq, count=T // bq, reverse=True
        )

    init = (
        tuple(jnp.zeros((bk, size), jnp.float32) for _, size in h_pieces),
        tuple(jnp.zeros((bk, size), jnp.float32) for _, size in o_pieces),
    )
    dks, dvs = lax.fori_loop(0, G, per_head, init)
    for dk, (off, size) in zip(dks, h_pieces):
        dk_ref[:, pl.ds(off, size)] = (dk * scale).astype(dk_ref.dtype)
    for dv, (off, size) in zip(dvs, o_pieces):
        dv_ref[:, pl.ds(off, size)] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, seg, *, scale, causal, blocks, interpret):
    B, T, N, H = q.shape
    M, O = k.shape[2], v.shape[3]
    G = N // M
    bq, bk = _fit(blocks.block_q, T), _fit(blocks.block_k, T)
    nq = T // bq
    kv_index = lambda i, b, n: (b, 0, lax.div(n, G), 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, nq - 1 - i, n, 0)),
        pl.BlockSpec((None, T, None, H), kv_index),
        pl.BlockSpec((None, T, None, O), kv_index),
    ]
    args = [q, k, v]
    if seg is not None:
        in_specs.append(pl.BlockSpec((None, T), lambda i, b, n: (b, 0)))
        args.append(seg)
    pieces = dict(h_pieces=_pieces(H), o_pieces=_pieces(O), has_seg=seg is not None)
    flops = 2 * B * N * T * T * (H + O) // (2 if causal else 1)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk, **pieces),
        grid=(nq, B, N),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, O), lambda i, b, n: (b, nq - 1 - i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, nq - 1 - i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, T, N, O), q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=B * N * T * T // (2 if causal else 1),
            bytes_accessed=_nbytes(q, k, v) + q.size * O // H * q.dtype.itemsize,
        ),
        interpret=interpret,
        name="flash_attention_fwd_gpu",
    )(*args)


def _backward(q, k, v, seg, out, lse, do, *, scale, causal, blocks, interpret):
    B, T, N, H = q.shape
    M, O = k.shape[2], v.shape[3]
    G = N // M
    h_pieces, o_pieces, has_seg = _pieces(H), _pieces(O), seg is not None
    # delta_t = sum_o out * dout: one fused elementwise pass in XLA, read by both kernels.
    delta = jnp.einsum("BTNO,BTNO->BNT", out.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(q.dtype)
    seg_args = [seg] if has_seg else []
    common = dict(scale=scale, causal=causal, h_pieces=h_pieces, o_pieces=o_pieces, has_seg=has_seg)
    params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)

    bq, bk = _fit(blocks.block_q_dq, T), _fit(blocks.block_k_dq, T)
    nq = T // bq
    q_block = lambda i, b, n: (b, nq - 1 - i, n, 0)  # noqa: E731
    kv_full = lambda i, b, n: (b, 0, lax.div(n, G), 0)  # noqa: E731
    row_block = lambda i, b, n: (b, n, nq - 1 - i)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, bk=bk, **common),
        grid=(nq, B, N),
        in_specs=[
            pl.BlockSpec((None, bq, None, H), q_block),
            pl.BlockSpec((None, T, None, H), kv_full),
            pl.BlockSpec((None, T, None, O), kv_full),
            pl.BlockSpec((None, bq, None, O), q_block),
            pl.BlockSpec((None, None, bq), row_block),
            pl.BlockSpec((None, None, bq), row_block),
        ]
        + [pl.BlockSpec((None, T), lambda i, b, n: (b, 0))] * has_seg,
        out_specs=pl.BlockSpec((None, bq, None, H), q_block),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=2 * B * N * T * T * (2 * H + O) // (2 if causal else 1),
            transcendentals=B * N * T * T // (2 if causal else 1),
            bytes_accessed=2 * _nbytes(q, k, v, do),
        ),
        interpret=interpret,
        name="flash_attention_dq_gpu",
    )(q, k, v, do, lse, delta, *seg_args)

    bq, bk = _fit(blocks.block_q_dkv, T), _fit(blocks.block_k_dkv, T)
    k_block = lambda j, b, m: (b, j, m, 0)  # noqa: E731
    q_heads = lambda j, b, m: (b, 0, m, 0)  # noqa: E731  (block of G heads: query heads m*G .. m*G+G-1)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, bq=bq, bk=bk, **common),
        grid=(T // bk, B, M),
        in_specs=[
            pl.BlockSpec((None, T, G, H), q_heads),
            pl.BlockSpec((None, bk, None, H), k_block),
            pl.BlockSpec((None, bk, None, O), k_block),
            pl.BlockSpec((None, T, G, O), q_heads),
            pl.BlockSpec((None, G, T), lambda j, b, m: (b, m, 0)),
            pl.BlockSpec((None, G, T), lambda j, b, m: (b, m, 0)),
        ]
        + [pl.BlockSpec((None, T), lambda j, b, m: (b, 0))] * has_seg,
        out_specs=[pl.BlockSpec((None, bk, None, H), k_block), pl.BlockSpec((None, bk, None, O), k_block)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=2 * B * N * T * T * (2 * H + 2 * O) // (2 if causal else 1),
            transcendentals=B * N * T * T // (2 if causal else 1),
            bytes_accessed=2 * _nbytes(q, k, v, do),
        ),
        interpret=interpret,
        name="flash_attention_dkdv_gpu",
    )(q, k, v, do, lse, delta, *seg_args)
    return dq, dk, dv


def _nbytes(*xs) -> int:
    return sum(x.size * x.dtype.itemsize for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, seg, scale, causal, blocks, interpret):
    return _forward(q, k, v, seg, scale=scale, causal=causal, blocks=blocks, interpret=interpret)[0]


def _attention_fwd(q, k, v, seg, scale, causal, blocks, interpret):
    out, lse = _forward(q, k, v, seg, scale=scale, causal=causal, blocks=blocks, interpret=interpret)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(scale, causal, blocks, interpret, residuals, do):
    q, k, v, seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, seg, out, lse, do, scale=scale, causal=causal, blocks=blocks, interpret=interpret)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_gpu(
    q_BxTxNxH: jax.Array,
    k_BxTxMxH: jax.Array,
    v_BxTxMxO: jax.Array,
    segment_ids_BxT: jax.Array | None,
    *,
    scale: float,
    causal: bool,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """softmax(q k^T * scale, masked) v -> [B, T, N, O] in q's dtype; differentiable in q, k, v.

    Inputs are validated by the public wrapper; this checks only what the kernels themselves need: T a multiple
    of 128 (so every block size up to 128 divides it) and head dims multiples of 16 (the smallest Triton dot).
    """
    T, H, O = q_BxTxNxH.shape[1], q_BxTxNxH.shape[3], v_BxTxMxO.shape[3]
    if T % 128:
        raise ValueError(f"flash_attention_gpu needs the time axis padded to a multiple of 128, got T={T}.")
    if H % 16 or O % 16:
        raise ValueError(f"flash_attention_gpu needs head dims that are multiples of 16, got H={H} and O={O}.")
    seg = None if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
    blocks = BlockSizes() if block_sizes is None else block_sizes
    return _attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, seg, float(scale), bool(causal), blocks, bool(interpret))
