"""MLA absorbed decode attention over the latent cache of a ragged batch: a Pallas TPU (Mosaic) kernel.

Every head reads the same K + R cached values per key (MQA-like), so one grid step holds all N heads of all T
new tokens as T*N query rows (row i = t*N + n) against one block of cache positions, and the latent block is
both the keys (with k_rope) and the values. The grid is (B, ceil(S / block_s)) with the cache axis last and
sequential, carrying an online softmax (running max m, running sum l, fp32 accumulator) in VMEM scratch.

Rows are ragged: `start_B` arrives by scalar prefetch (it lives in SMEM before the grid runs, so index maps can
read it). Row b's furthest query sits at start_B[b] + T - 1; cache blocks after the one holding it are neither
computed (`pl.when`) nor fetched (their index map repeats the row's last needed block, and the pipeline skips
a DMA whose block index did not change). Decode is bound by reading the cache, so this is where the time goes.

k_rope is read as [B, R, S] (see the wrapper below for why); the scores are
q_latent [TN, K] . latent_blk [bs, K]^T + q_rope [TN, R] . k_rope_blk [R, bs], and the output p [TN, bs] . latent_blk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Cache positions are the lane (last) axis of the [T*N, block_s] score tile, so blocks are whole lane widths.
LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_s: cache positions per grid step (a multiple of 128). Larger blocks mean fewer, longer DMAs and
    fewer grid steps, but up to block_s - 1 positions past a row's end are read (and masked) in its last block.
    A cache shorter than block_s is one block of its own length."""

    block_s: int = 512

    def __post_init__(self):
        if not isinstance(self.block_s, int) or isinstance(self.block_s, bool):
            raise ValueError(f"block_sizes.block_s must be an int, got {self.block_s!r}.")
        if self.block_s <= 0 or self.block_s % LANES:
            raise ValueError(f"block_sizes.block_s must be a positive multiple of {LANES}, got {self.block_s}.")


def last_position(start_B_ref, b, new_tokens: int, length: int):
    """The furthest cache position row b reads: its last new token's own position (clamped into the cache, so
    a bad start never sends a DMA out of bounds)."""
    return jnp.minimum(start_B_ref[b] + new_tokens - 1, length - 1)


def kv_block(b, s, start_B_ref, *, new_tokens: int, length: int, block_s: int):
    """The cache block grid step (b, s) loads: steps past row b's last needed block repeat that block, so the
    pipeline sees an unchanged block index and issues no DMA for them."""
    # lax.div truncates (jnp's // lowers through `sign`, which needs a live TPU to lower); the position is
    # clamped non-negative first, so truncation is the floor.
    last_block = jax.lax.div(jnp.maximum(last_position(start_B_ref, b, new_tokens, length), 0), block_s)
    return jnp.minimum(s, last_block)


def _matmul(a, b, *, contract: tuple[int, int]):
    """a . b on the MXU, contracting a's axis contract[0] with b's contract[1], accumulating in fp32. The precision
    is pinned so a global `jax_default_matmul_precision` never reaches Mosaic (it rejects HIGHEST on bf16): full
    fp32 products for fp32 operands, one pass for bf16 (whose products are exact in fp32 anyway)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kernel(
    start_B_ref,  # scalar prefetch (SMEM) [B] int32
    q_latent_ref,  # [TN, K]
    q_rope_ref,  # [TN, R]
    latent_ref,  # [block_s, K]
    k_rope_ref,  # [R, block_s]
    out_ref,  # [TN, K]
    m_ref,  # scratch [TN, 1] f32: running max of the scaled scores
    l_ref,  # scratch [TN, 1] f32: running sum of exp(score - m)
    acc_ref,  # scratch [TN, K] f32: running sum of exp(score - m) * latent
    *,
    scale: float,
    heads: int,
    new_tokens: int,
    length: int,
    block_s: int,
):
    b, s = pl.program_id(0), pl.program_id(1)
    start = start_B_ref[b]
    last = last_position(start_B_ref, b, new_tokens, length)

    @pl.when(s == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(s * block_s <= last)
    def _step():
        q_latent, q_rope = q_latent_ref[...], q_rope_ref[...]
        # Positions past the row's end are in the block too (its tail, or past the cache in a partial last
        # block, whose contents are undefined): zero them, since a masked probability of 0 times NaN is NaN.
        pos_Sx1 = s * block_s + jax.lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        latent = jnp.where(pos_Sx1 <= last, latent_ref[...], 0)

        scores = _matmul(q_latent, latent.astype(q_latent.dtype), contract=(1, 1))  # q @ latent_blk^T
        scores += _matmul(q_rope, k_rope_ref[...].astype(q_rope.dtype), contract=(1, 0))
        # Row i is new token t = i // N at position start + t; it sees pos <= start + t, written as
        # (pos - start) * N <= i to keep integer division off the vector unit. `pos <= last` drops any garbage
        # (even NaN) score past the row's end.
        shape = scores.shape
        row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        pos = s * block_s + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        visible = ((pos - start) * heads <= row) & (pos <= last)
        scores = jnp.where(visible, scores * scale, -jnp.inf)

        # Block 0 always holds position 0, which every row sees, so m is finite from the first step on and
        # the rescale below never computes exp(-inf - (-inf)).
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))
        rescale = jnp.exp(m_prev - m_new)
        p = jnp.exp(scores - m_new)
        l_ref[...] = rescale * l_ref[...] + p.sum(axis=-1, keepdims=True)
        # Probabilities meet the values in the cache's dtype (bf16 on the MXU), as the XLA path does.
        pv = _matmul(p.astype(latent.dtype), latent, contract=(1, 0))
        acc_ref[...] = rescale * acc_ref[...] + pv
        m_ref[...] = m_new

    @pl.when(s == pl.num_programs(1) - 1)
    def _finish():
        out_ref[...] = (acc_ref[...] / l_ref[...]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def latent_decode_attention_tpu(
    q_latent_BxTxNxK: jax.Array,
    q_rope_BxTxNxR: jax.Array,
    latent_BxSxK: jax.Array,
    k_rope_BxSxR: jax.Array,
    start_B: jax.Array,
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:
    """The kernel on already validated inputs (see the package wrapper); returns [B, T, N, K] in the latent's
    dtype. q_latent and q_rope share one dtype; latent and k_rope share one dtype."""
    B, T, N, K = q_latent_BxTxNxK.shape
    R = q_rope_BxTxNxR.shape[-1]
    S = latent_BxSxK.shape[1]
    TN = T * N
    # A short cache is one block of its own length (a block equal to the array is always a legal tile); a
    # longer one ends in a partial block instead of being padded, which would copy the whole cache every step.
    block_s = min(block_sizes.block_s, S)
    num_blocks = pl.cdiv(S, block_s)

    # [B, T, N, K] -> [B, T*N, K] is free (contiguous): row i = t*N + n.
    q_latent_BxIxK = q_latent_BxTxNxK.reshape(B, TN, K)
    q_rope_BxIxR = q_rope_BxTxNxR.reshape(B, TN, R)
    # XLA:TPU lays out an array whose last axis is narrower than a lane row (R = 64) with S as the minor axis
    # (the AOT-compiled HLO for v5e, v5p and v6e shows it), so [B, S, R] -> [B, R, S] is a free relabelling,
    # while reading [B, S, R] blocks made XLA copy the whole k_rope cache into row-major order on every call.
    # [R, block_s] tiles are lane-dense too.
    k_rope_BxRxS = jnp.swapaxes(k_rope_BxSxR, 1, 2)

    block = functools.partial(kv_block, new_tokens=T, length=S, block_s=block_s)

    def latent_index(b, s, start_B_ref):  # [B, S, K]: blocks along S
        return b, block(b, s, start_B_ref), 0

    def k_rope_index(b, s, start_B_ref):  # [B, R, S]: blocks along S, now the last axis
        return b, 0, block(b, s, start_B_ref)

    def q_index(b, s, start_B_ref):  # queries and output stay resident across a row's cache blocks
        return b, 0, 0

    # Upper bounds: the kernel reads and computes only each row's visible prefix, unknown until run time.
    cache_bytes = latent_BxSxK.size * latent_BxSxK.dtype.itemsize + k_rope_BxSxR.size * k_rope_BxSxR.dtype.itemsize
    q_bytes = q_latent_BxIxK.size * q_latent_BxIxK.dtype.itemsize + q_rope_BxIxR.size * q_rope_BxIxR.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * B * TN * S * (K + R) + 2 * B * TN * S * K,
        transcendentals=B * TN * S,
        bytes_accessed=cache_bytes + q_bytes + B * TN * K * latent_BxSxK.dtype.itemsize,
    )

    out_BxIxK = pl.pallas_call(
        functools.partial(_kernel, scale=scale, heads=N, new_tokens=T, length=S, block_s=block_s),
        out_shape=jax.ShapeDtypeStruct((B, TN, K), latent_BxSxK.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, num_blocks),
            in_specs=[
                pl.BlockSpec((None, TN, K), q_index),
                pl.BlockSpec((None, TN, R), q_index),
                pl.BlockSpec((None, block_s, K), latent_index),
                pl.BlockSpec((None, R, block_s), k_rope_index),
            ],
            out_specs=pl.BlockSpec((None, TN, K), q_index),
            scratch_shapes=[
                pltpu.VMEM((TN, 1), jnp.float32),
                pltpu.VMEM((TN, 1), jnp.float32),
                pltpu.VMEM((TN, K), jnp.float32),
            ],
        ),
        # Rows are independent (split across TensorCores where a chip has two); the cache axis carries the
        # online softmax, so it runs in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="latent_decode_attention",
    )(start_B.astype(jnp.int32), q_latent_BxIxK, q_rope_BxIxR, latent_BxSxK, k_rope_BxRxS)
    return out_BxIxK.reshape(B, T, N, K)
