"""Pure-jnp MLA absorbed decode attention over a latent cache: the ground truth the Pallas kernel is tested against.

Row b's T new queries sit at cache positions start_B[b] + t (already written to the cache); query t sees the
cache positions s <= start_B[b] + t. Each head's score against position s is
(q_latent . latent[s] + q_rope . k_rope[s]) * scale, the softmax runs in float32, and the output is the
probability-weighted latent (still in latent space: the caller applies W_UV and W_O).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_BxTxS(start_B: jax.Array, new_tokens: int, length: int) -> jax.Array:
    """[B, T, S]: new token t of row b (at position start_B[b] + t) sees cache positions s <= its own."""
    query_pos_BxT = start_B[:, None] + jnp.arange(new_tokens)[None, :]
    return jnp.arange(length)[None, None, :] <= query_pos_BxT[:, :, None]


def latent_decode_attention_reference(
    q_latent_BxTxNxK: jax.Array,
    q_rope_BxTxNxR: jax.Array,
    latent_BxSxK: jax.Array,
    k_rope_BxSxR: jax.Array,
    start_B: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """[B, T, N, K] in the latent's dtype; probabilities meet the latent in its own dtype, as on the MXU."""
    T, S = q_latent_BxTxNxK.shape[1], latent_BxSxK.shape[1]
    f32 = jnp.float32
    scores = jnp.einsum("BTNK,BSK->BTNS", q_latent_BxTxNxK, latent_BxSxK, preferred_element_type=f32)
    scores += jnp.einsum("BTNR,BSR->BTNS", q_rope_BxTxNxR, k_rope_BxSxR, preferred_element_type=f32)
    visible = visible_BxTxS(start_B, T, S)[:, :, None, :]
    scores = jnp.where(visible, scores * scale, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(latent_BxSxK.dtype)
    return jnp.einsum("BTNS,BSK->BTNK", probs, latent_BxSxK)
