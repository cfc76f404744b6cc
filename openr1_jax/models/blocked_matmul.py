"""The dropless MoE's grouped matmul in plain XLA ops, with the FLOPs of the routed rows only.

`jax.lax.ragged_dot` is native on TPU, but XLA:CPU and XLA:GPU lower it densely: every row meets every group's
weights under a mask ([M, G*K] on CPU, a [G, M, K] batch on GPU), G times the work and, on GPU, the memory. Here
each group's rows are padded to whole blocks of `block` rows instead, and each block is one [block, K] x [K, N]
product with its group's weights, so the work is that of sum_g ceil(M_g / block) * block <= M + G * block rows:

  slot(i)    = padded_start[g(i)] + i - start[g(i)]      row i of group g(i) -> its place in the padded layout
  x_pad      = scatter rows into [nb * block, K]        (padding rows are zeros)
  y_pad[n]   = x_pad[n] @ w[group of block n]            one batched matmul over the nb blocks
  y[i]       = y_pad[slot(i)]                            rows past sum(group_sizes) belong to no group: 0

jax differentiates it as it stands (the weight gradient scatter-adds each block's [K, N] product into its group).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_BLOCK = 64  # rows per block: measured on CPU at the tiny MoEs' training shapes, 32-128 are within 15%


def default_block(rows: int, groups: int) -> int:
    """MAX_BLOCK, or the power of two >= the mean group size when that is smaller (decoding: a few rows per
    group), so padding never costs more than about one block per group."""
    return min(MAX_BLOCK, 1 << max(0, -(-rows // groups) - 1).bit_length())


def block_count(rows: int, groups: int, block: int) -> int:
    """A static bound on the blocks the padded layout needs: sum_g ceil(M_g / block) <= ceil(M / block) + G."""
    return -(-rows // block) + groups


def blocked_ragged_dot(x_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array, block: int | None = None):
    """`jax.lax.ragged_dot(x_MxK, w_GxKxN, group_sizes_G)`: rows of x sorted by group, times their group's weights."""
    M, K = x_MxK.shape
    G, _, N = w_GxKxN.shape
    block = block or default_block(M, G)
    dtype = jnp.result_type(x_MxK.dtype, w_GxKxN.dtype)
    sizes_G = group_sizes_G.astype(jnp.int32)
    blocks_G = (sizes_G + block - 1) // block
    nb = block_count(M, G, block)
    end_G = jnp.cumsum(sizes_G)
    padded_start_G = jnp.cumsum(blocks_G * block) - blocks_G * block

    rows_M = jnp.arange(M, dtype=jnp.int32)
    group_M = jnp.searchsorted(end_G, rows_M, side="right").astype(jnp.int32)  # G: past every group
    routed_M = group_M < G
    g_M = jnp.minimum(group_M, G - 1)
    slot_M = jnp.where(routed_M, padded_start_G[g_M] + rows_M - (end_G - sizes_G)[g_M], nb * block)

    x_pad = jnp.zeros((nb * block, K), dtype).at[slot_M].set(x_MxK.astype(dtype), mode="drop")
    block_group = jnp.searchsorted(jnp.cumsum(blocks_G), jnp.arange(nb, dtype=jnp.int32), side="right")
    w_NBxKxN = w_GxKxN.astype(dtype)[jnp.minimum(block_group, G - 1)]
    y_pad = jnp.einsum("nbk,nkf->nbf", x_pad.reshape(nb, block, K), w_NBxKxN).reshape(nb * block, N)
    return y_pad.at[slot_M].get(mode="fill", fill_value=0)  # unrouted rows' slot lies past the end: 0
