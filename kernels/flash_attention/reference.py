"""Pure-jnp flash attention maths: the ground truth the Pallas kernels are tested against, and the XLA path.

It materialises the [T, S] scores, so it is for tests, CPU and short sequences. Legend: B batch, T query time,
S key time (= T, self-attention), N query heads, M key/value heads, G = N // M query heads per kv head,
H query/key head dim, O value head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(segment_ids_BxT: jax.Array | None, T: int, *, causal: bool) -> jax.Array:
    """[B or 1, T, S] True where query t may attend key s: same segment, and s <= t when causal."""
    mask_BxTxS = jnp.ones((1, T, T), dtype=bool)
    if causal:
        mask_BxTxS = jnp.tril(mask_BxTxS)
    if segment_ids_BxT is not None:
        mask_BxTxS = mask_BxTxS & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
    return mask_BxTxS


def flash_attention_with_lse_reference(
    q_BxTxNxH: jax.Array,
    k_BxTxMxH: jax.Array,
    v_BxTxMxO: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    *,
    scale: float,
    causal: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(out [B, T, N, O] in q's dtype, lse [B, N, T] float32): softmax(q k^T * scale, masked) v, with the
    scores and softmax in float32 and the log-sum-exp of each query row's scaled, masked scores."""
    B, T, N, H = q_BxTxNxH.shape
    M, O = k_BxTxMxH.shape[2], v_BxTxMxO.shape[3]
    q_BxTxMxGxH = q_BxTxNxH.reshape(B, T, M, N // M, H)
    scores_BxMxGxTxS = jnp.einsum("BTMGH,BSMH->BMGTS", q_BxTxMxGxH, k_BxTxMxH, preferred_element_type=jnp.float32)
    mask_BxTxS = attention_mask(segment_ids_BxT, T, causal=causal)
    scores_BxMxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxMxGxTxS * scale, jnp.finfo(jnp.float32).min)
    lse_BxMxGxT = jax.nn.logsumexp(scores_BxMxGxTxS, axis=-1)
    probs_BxMxGxTxS = jnp.exp(scores_BxMxGxTxS - lse_BxMxGxT[..., None])
    out_BxTxMxGxO = jnp.einsum(
        "BMGTS,BSMO->BTMGO",
        probs_BxMxGxTxS.astype(v_BxTxMxO.dtype),
        v_BxTxMxO,
        preferred_element_type=jnp.float32,
    )
    return out_BxTxMxGxO.reshape(B, T, N, O).astype(q_BxTxNxH.dtype), lse_BxMxGxT.reshape(B, N, T)


def flash_attention_reference(
    q_BxTxNxH: jax.Array,
    k_BxTxMxH: jax.Array,
    v_BxTxMxO: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    *,
    scale: float,
    causal: bool = True,
) -> jax.Array:
    """out [B, T, N, O]: the attention of `flash_attention`, computed the plain way (see the module docstring)."""
    out, _ = flash_attention_with_lse_reference(
        q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale=scale, causal=causal
    )
    return out
