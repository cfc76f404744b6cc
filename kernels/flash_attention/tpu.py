"""Flash attention for TPU (Mosaic): three pallas_calls (forward, dq, dk/dv) under one jax.custom_vjp.

Arrays are head-major here, q [B, N, T, H], k [B, M, T, H], v [B, M, T, O], so every block is a 2-D
(time, head_dim) tile; the public wrapper transposes, and pads T to a multiple of the block sizes. Query head n
reads kv head n // G (GQA, G = N // M). The forward keeps a running max and sum per query row (online softmax)
and saves the log-sum-exp, from which the backward recomputes the probabilities block by block
(flash-attention-2): one kernel accumulates dq over kv blocks, another dk and dv over query blocks and over the
G query heads that share a kv head. Scores, softmax and accumulators are float32 whatever the input dtype.

With `causal`, blocks above the diagonal are skipped (pl.when), and their index maps repeat a block that is
needed anyway, so the pipeline does not DMA a block nobody reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # a vreg is 8 sublanes x 128 lanes
SUBLANES = 8
# Finite, so a block row whose keys are all masked gives exp(0) = 1 rather than exp(-inf - -inf) = nan; the
# running max later meets the row's real scores and the rescale exp(MASK_VALUE - real) wipes those terms out.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T without materialising the transpose


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along time: `block_q` x `block_kv` for the forward, `*_dq` for the dq kernel, `*_dkv` for the
    dk/dv kernel. Each must be a positive multiple of 128 (kv positions and, in the dk/dv kernel, query
    positions sit on the 128 lanes). 512 keeps the MXU busy and the per-step overhead small while a block's
    float32 scores (1 MiB) and the double-buffered inputs stay well inside the default scoped VMEM of
    v5e/v5p/v6e; smaller blocks skip more of the causal upper triangle on short sequences."""

    block_q: int = 512
    block_kv: int = 512
    block_q_dq: int = 512
    block_kv_dq: int = 512
    block_q_dkv: int = 512
    block_kv_dkv: int = 512

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value <= 0 or value % LANES:
                raise ValueError(f"BlockSizes.{field.name} must be a positive multiple of {LANES}, got {value!r}.")

    def fit(self, T: int) -> tuple[BlockSizes, int]:
        """(block sizes for a sequence of length T, padded length): blocks shrink to T rounded up to 128, T pads
        to a multiple of the largest, and a block that does not divide that shrinks to the gcd (still a multiple
        of 128), so each grid covers the padded length exactly and padding stays under one block."""
        T128 = -(-T // LANES) * LANES
        clamped = {f.name: min(getattr(self, f.name), T128) for f in dataclasses.fields(self)}
        multiple = max(clamped.values())
        T_padded = -(-T // multiple) * multiple
        return BlockSizes(**{name: math.gcd(b, T_padded) for name, b in clamped.items()}), T_padded


def _dot(a, b, dims=NN_DIMS):
    """float32-accumulated matmul with its precision pinned here, not by the global jax_default_matmul_precision
    (Mosaic rejects "highest" on bf16 operands; float32 operands get the full multi-pass precision)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _visible(q_block, block_q, kv_block, block_kv):
    """Whether a (query block, kv block) pair holds any s <= t, i.e. is not wholly above the causal diagonal."""
    return kv_block * block_kv <= q_block * block_q + block_q - 1


def _visible_pairs(T: int, block_q: int, block_kv: int, causal: bool) -> int:
    """How many (query block, kv block) pairs the kernels compute (for the cost estimates)."""
    nq, nk = T // block_q, T // block_kv
    if not causal:
        return nq * nk
    return sum(min(nk, (i * block_q + block_q - 1) // block_kv + 1) for i in range(nq))


def _scores(x_ref, y_ref, x_start, y_start, x_ids, y_ids, *, scale, causal, x_is_query):
    """Scaled scores x @ y.T in float32 with invisible pairs set to MASK_VALUE. x's rows are queries (or keys
    when not `x_is_query`) starting at time x_start; the ids are [rows, 1] and [1, cols] segment-id slices."""
    s = _dot(x_ref[...], y_ref[...], NT_DIMS) * scale
    mask = None
    if causal:
        x_pos = x_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        y_pos = y_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = y_pos <= x_pos if x_is_query else x_pos <= y_pos
    if x_ids is not None:
        same = x_ids == y_ids
        mask = same if mask is None else mask & same
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _column(rows_8xQ):
    """[8, Q] rows of per-query values -> [Q, 128] columns, through a lane-aligned [128, Q] -> [Q, 128]
    transpose (once per query block, on the XLU), so HBM only ever holds the 16x smaller row layout."""
    return jnp.broadcast_to(rows_8xQ[:1, :], (LANES, rows_8xQ.shape[1])).T


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, scale, causal, has_segments, save_lse):
    q_ids_ref, kv_ids_ref = refs[:2] if has_segments else (None, None)
    refs = refs[2:] if has_segments else refs
    o_ref, lse_ref = (refs[0], refs[1]) if save_lse else (refs[0], None)
    m_ref, l_ref, acc_ref = refs[-3:]
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(_visible(i, block_q, j, block_kv) if causal else True)
    def _step():
        ids = (q_ids_ref[:, :1], kv_ids_ref[:1, :]) if has_segments else (None, None)
        s = _scores(q_ref, k_ref, i * block_q, j * block_kv, *ids, scale=scale, causal=causal, x_is_query=True)
        # m and l are kept replicated over 128 lanes: a [block_q, 1] array would pad to that in VMEM anyway.
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_next[:, :1])
        alpha = jnp.exp(m_prev - m_next)  # rescales what was summed under the old max
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        pv = _dot(p.astype(v_ref.dtype), v_ref[...])
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / l[:, :1]).astype(o_ref.dtype)  # normalise once, not every step
        if save_lse:
            lse_ref[...] = (m_ref[...] + jnp.log(l)).T[:SUBLANES]  # columns -> the [8, block_q] row layout


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, causal, has_segments):
    q_ids_ref, kv_ids_ref = refs[:2] if has_segments else (None, None)
    dq_ref, acc_ref, lse_col_ref, di_col_ref = refs[2:] if has_segments else refs
    block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        lse_col_ref[...] = _column(lse_ref[...])
        di_col_ref[...] = _column(di_ref[...])

    @pl.when(_visible(i, block_q, j, block_kv) if causal else True)
    def _step():
        ids = (q_ids_ref[:, :1], kv_ids_ref[:1, :]) if has_segments else (None, None)
        s = _scores(q_ref, k_ref, i * block_q, j * block_kv, *ids, scale=scale, causal=causal, x_is_query=True)
        p = jnp.exp(s - lse_col_ref[:, :1])
        dp = _dot(do_ref[...], v_ref[...], NT_DIMS)
        ds = p * (dp - di_col_ref[:, :1])  # softmax backward; di = rowsum(dO * O)
        acc_ref[...] += _dot(ds.astype(k_ref.dtype), k_ref[...])

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, causal, has_segments):
    # Works on transposed scores sT = k q^T [block_kv, block_q], so dv += pT @ dO and dk += dsT @ q are plain
    # matmuls, and per-query values (lse, di, segment ids) are needed as rows, the layout they arrive in.
    q_ids_ref, kv_ids_ref = refs[:2] if has_segments else (None, None)
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs[2:] if has_segments else refs
    block_kv, block_q = k_ref.shape[0], q_ref.shape[0]
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    @pl.when(_visible(i, block_q, j, block_kv) if causal else True)
    def _step():
        ids = (kv_ids_ref[:, :1], q_ids_ref[:1, :]) if has_segments else (None, None)
        s_t = _scores(k_ref, q_ref, j * block_kv, i * block_q, *ids, scale=scale, causal=causal, x_is_query=False)
        p_t = jnp.exp(s_t - lse_ref[:1, :])
        do = do_ref[...]
        dp_t = _dot(v_ref[...], do, NT_DIMS)
        ds_t = p_t * (dp_t - di_ref[:1, :])
        dv_acc_ref[...] += _dot(p_t.astype(do.dtype), do)
        dk_acc_ref[...] += _dot(ds_t.astype(q_ref.dtype), q_ref[...])

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _lanes(x_BxT):
    """[B, T] -> [B, T, 128]: per-query (or per-key) values as columns of (time, lanes) tiles."""
    return jnp.broadcast_to(x_BxT[..., None], (*x_BxT.shape, LANES))


def _sublanes(x_BxT):
    """[B, ..., T] -> [B, ..., 8, T]: per-time values as rows of (sublanes, time) tiles."""
    return jnp.broadcast_to(x_BxT[..., None, :], (*x_BxT.shape[:-1], SUBLANES, x_BxT.shape[-1]))


def _nbytes(*arrays) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


def _row_bytes(*arrays) -> int:
    """Bytes of one time step (one row of the last dim) of each array: what a block re-read costs per row."""
    return sum(a.shape[-1] * jnp.dtype(a.dtype).itemsize for a in arrays)


def _params(parallel: int, arbitrary: int):
    # "arbitrary" axes revisit one output block to accumulate into it, so they must run in order on one core;
    # "parallel" axes may be split across cores (megacore).
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * parallel + ("arbitrary",) * arbitrary)


def _forward(q, k, v, segment_ids, *, scale, causal, block_sizes, interpret, save_lse):
    """out [B, N, T, O], and with `save_lse` the log-sum-exp [B, N, T] float32 of each query row."""
    B, N, T, H = q.shape
    M, O = k.shape[1], v.shape[3]
    G = N // M
    bq, bk = block_sizes.block_q, block_sizes.block_kv
    has_segments = segment_ids is not None

    def kv_block(i, j):
        # A skipped step asks for kv block 0: that is the first block the next query block needs, so the
        # pipeline fetches it early and never fetches the skipped one.
        return lax.select(_visible(i, bq, j, bk), j, 0) if causal else j

    # Index maps use lax.div: traced `//` rounds toward -inf through a sign fix-up that Mosaic cannot lower
    # when compiling ahead of time; every index here is non-negative, so truncation is the same.
    in_specs = [
        pl.BlockSpec((None, None, bq, H), lambda b, n, i, j: (b, n, i, 0)),
        pl.BlockSpec((None, None, bk, H), lambda b, n, i, j: (b, lax.div(n, G), kv_block(i, j), 0)),
        pl.BlockSpec((None, None, bk, O), lambda b, n, i, j: (b, lax.div(n, G), kv_block(i, j), 0)),
    ]
    args = [q, k, v]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b, n, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, n, i, j: (b, 0, kv_block(i, j))),
        ]
        args += [_lanes(segment_ids), _sublanes(segment_ids)]
    out_shape = [jax.ShapeDtypeStruct((B, N, T, O), q.dtype)]
    out_specs = [pl.BlockSpec((None, None, bq, O), lambda b, n, i, j: (b, n, i, 0))]
    if save_lse:
        out_shape.append(jax.ShapeDtypeStruct((B, N, SUBLANES, T), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, j: (b, n, 0, i)))
    pairs = B * N * _visible_pairs(T, bq, bk, causal)
    cost = pl.CostEstimate(
        flops=2 * pairs * bq * bk * (H + O),
        transcendentals=pairs * bq * bk,
        bytes_accessed=_nbytes(q, *args[3:], *out_shape) + pairs * bk * _row_bytes(k, v),
    )
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, has_segments=has_segments, save_lse=save_lse),
        out_shape=out_shape,
        grid=(B, N, T // bq, T // bk),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),  # running max
            pltpu.VMEM((bq, LANES), jnp.float32),  # running sum
            pltpu.VMEM((bq, O), jnp.float32),  # unnormalised output
        ],
        compiler_params=_params(3, 1),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)
    return (outs[0], outs[1][:, :, 0]) if save_lse else (outs[0], None)


def _backward_dq(q, k, v, segment_ids, do, lse_rows, di_rows, *, scale, causal, block_sizes, interpret):
    B, N, T, H = q.shape
    M, O = k.shape[1], v.shape[3]
    G = N // M
    bq, bk = block_sizes.block_q_dq, block_sizes.block_kv_dq
    has_segments = segment_ids is not None

    def kv_block(i, j):
        return lax.select(_visible(i, bq, j, bk), j, 0) if causal else j

    def q_spec(width):
        return pl.BlockSpec((None, None, bq, width), lambda b, n, i, j: (b, n, i, 0))

    def kv_spec(width):
        return pl.BlockSpec((None, None, bk, width), lambda b, n, i, j: (b, lax.div(n, G), kv_block(i, j), 0))

    q_row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, j: (b, n, 0, i))
    in_specs = [q_spec(H), kv_spec(H), kv_spec(O), q_spec(O), q_row_spec, q_row_spec]
    args = [q, k, v, do, lse_rows, di_rows]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b, n, i, j: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, n, i, j: (b, 0, kv_block(i, j))),
        ]
        args += [_lanes(segment_ids), _sublanes(segment_ids)]
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    pairs = B * N * _visible_pairs(T, bq, bk, causal)
    cost = pl.CostEstimate(
        flops=2 * pairs * bq * bk * (2 * H + O),
        transcendentals=pairs * bq * bk,
        bytes_accessed=_nbytes(q, do, *args[4:], out_shape) + pairs * bk * _row_bytes(k, v),
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, has_segments=has_segments),
        out_shape=out_shape,
        grid=(B, N, T // bq, T // bk),
        in_specs=in_specs,
        out_specs=q_spec(H),
        scratch_shapes=[
            pltpu.VMEM((bq, H), jnp.float32),  # dq accumulator
            pltpu.VMEM((bq, LANES), jnp.float32),  # lse as columns
            pltpu.VMEM((bq, LANES), jnp.float32),  # di as columns
        ],
        compiler_params=_params(3, 1),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_bwd_dq",
    )(*args)


def _backward_dkv(q, k, v, segment_ids, do, lse_rows, di_rows, *, scale, causal, block_sizes, interpret):
    B, N, T, H = q.shape
    M, O = k.shape[1], v.shape[3]
    G = N // M
    bq, bk = block_sizes.block_q_dkv, block_sizes.block_kv_dkv
    has_segments = segment_ids is not None

    # Grid (b, m, kv block j, head in group g, query block i): the last two axes are the reduction, so the
    # G query heads of kv head m all add into the same dk/dv accumulators (GQA needs no separate sum).
    def q_block(j, i):
        # Skipped query blocks (i too small to see kv block j) ask for the first one that is not skipped,
        # which is therefore fetched early and only once.
        return jnp.maximum(i, lax.div(j * bk, bq)) if causal else i

    def q_spec(width):
        return pl.BlockSpec((None, None, bq, width), lambda b, m, j, g, i: (b, m * G + g, q_block(j, i), 0))

    def kv_spec(width):
        return pl.BlockSpec((None, None, bk, width), lambda b, m, j, g, i: (b, m, j, 0))

    q_row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, m, j, g, i: (b, m * G + g, 0, q_block(j, i)))
    in_specs = [q_spec(H), kv_spec(H), kv_spec(O), q_spec(O), q_row_spec, q_row_spec]
    args = [q, k, v, do, lse_rows, di_rows]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, SUBLANES, bq), lambda b, m, j, g, i: (b, 0, q_block(j, i))),
            pl.BlockSpec((None, bk, LANES), lambda b, m, j, g, i: (b, j, 0)),
        ]
        args += [_sublanes(segment_ids), _lanes(segment_ids)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    pairs = B * N * _visible_pairs(T, bq, bk, causal)
    per_q_row = _row_bytes(q, do) + (3 if has_segments else 2) * SUBLANES * 4
    cost = pl.CostEstimate(
        flops=2 * pairs * bq * bk * (2 * H + 2 * O),
        transcendentals=pairs * bq * bk,
        bytes_accessed=_nbytes(k, v, *out_shape) + pairs * bq * per_q_row,
    )
    return pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, has_segments=has_segments),
        out_shape=out_shape,
        grid=(B, M, T // bk, G, T // bq),
        in_specs=in_specs,
        out_specs=[kv_spec(H), kv_spec(O)],
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, O), jnp.float32)],
        compiler_params=_params(3, 2),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_bwd_dkv",
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash_attention(q, k, v, segment_ids, scale, causal, block_sizes, interpret):
    kw = dict(scale=scale, causal=causal, block_sizes=block_sizes, interpret=interpret)
    return _forward(q, k, v, segment_ids, save_lse=False, **kw)[0]  # no gradient wanted: skip the lse


def _flash_attention_fwd(q, k, v, segment_ids, scale, causal, block_sizes, interpret):
    kw = dict(scale=scale, causal=causal, block_sizes=block_sizes, interpret=interpret)
    out, lse = _forward(q, k, v, segment_ids, save_lse=True, **kw)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_attention_bwd(scale, causal, block_sizes, interpret, residuals, do):
    q, k, v, segment_ids, out, lse = residuals
    # di = rowsum(dO * O) = sum_s p_ts dp_ts: the softmax-backward term, one number per query row.
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    args = (q, k, v, segment_ids, do, _sublanes(lse), _sublanes(di))
    kw = dict(scale=scale, causal=causal, block_sizes=block_sizes, interpret=interpret)
    dq = _backward_dq(*args, **kw)
    dk, dv = _backward_dkv(*args, **kw)
    return dq, dk, dv, None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def flash_attention_tpu(
    q_BxNxTxH: jax.Array,
    k_BxMxTxH: jax.Array,
    v_BxMxTxO: jax.Array,
    segment_ids_BxT: jax.Array | None,
    *,
    scale: float,
    causal: bool,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:
    """out [B, N, T, O] (q's dtype), differentiable in q, k, v. Head-major inputs; T must be a multiple of every
    block size (use `BlockSizes.fit`); the public `flash_attention` wrapper does the layout and padding."""
    T = q_BxNxTxH.shape[2]
    for field in dataclasses.fields(block_sizes):
        if T % getattr(block_sizes, field.name):
            raise ValueError(f"sequence length {T} is not a multiple of BlockSizes.{field.name}; pad it first.")
    return _flash_attention(
        q_BxNxTxH, k_BxMxTxH, v_BxMxTxO, segment_ids_BxT, float(scale), bool(causal), block_sizes, bool(interpret)
    )
