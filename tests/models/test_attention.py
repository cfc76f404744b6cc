"""The XLA attention path: query blocks over the causal diagonal and a backward pass that recomputes the
probabilities from the saved logsumexp equal the plain masked softmax, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from openr1_jax_kernels.flash_attention.reference import attention_mask, flash_attention_reference

from openr1_jax.models import kv_cache
from openr1_jax.models.attention import causal_attention, decode_attention


def plain_attention(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale):
    """The kernels' pure-jnp reference: the whole masked softmax at once, differentiated by JAX."""
    return flash_attention_reference(q_BxTxNxH, k_BxTxMxH, v_BxTxMxO, segment_ids_BxT, scale=scale)


def inputs(B, T, N, M, H, O, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    segments = np.sort(np.random.default_rng(seed).integers(1, 4, (B, T)), axis=1)  # packed rows of 1-3 segments
    return (
        jax.random.normal(ks[0], (B, T, N, H)),
        jax.random.normal(ks[1], (B, T, M, H)),
        jax.random.normal(ks[2], (B, T, M, O)),
        jnp.asarray(segments, jnp.int32),
        jax.random.normal(ks[3], (B, T, N, O)),
    )


@pytest.mark.parametrize(
    "B, T, N, M, H, O",
    [
        (2, 300, 4, 4, 24, 16),  # MLA-like: one key head per query head, O != H; 8 uneven blocks
        (2, 130, 8, 2, 16, 16),  # GQA, 4 query heads per key head; 4 blocks
        (3, 40, 2, 1, 8, 8),  # shorter than one block
        (1, 1024, 2, 2, 8, 8),  # the 8-block cap
    ],
)
def test_blocked_attention_equals_the_plain_softmax(B, T, N, M, H, O):
    q, k, v, segments, weights = inputs(B, T, N, M, H, O)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v, segments, 0.3) * weights)

    np.testing.assert_allclose(
        jax.jit(causal_attention, static_argnums=4)(q, k, v, segments, 0.3),
        plain_attention(q, k, v, segments, 0.3),
        atol=2e-6,
        rtol=1e-5,
    )
    got = jax.jit(jax.grad(loss(causal_attention), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss(plain_attention), (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, segments, weights = inputs(2, 192, 4, 2, 16, 16)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = jax.jit(causal_attention, static_argnums=4)(*low, segments, 0.25)
    grads = jax.jit(
        jax.grad(lambda *x: jnp.sum(causal_attention(*x, segments, 0.25).astype(jnp.float32) * weights), (0, 1, 2))
    )(*low)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(out.astype(jnp.float32), plain_attention(q, k, v, segments, 0.25), atol=3e-2)


def test_the_blocks_skip_the_scores_above_the_diagonal():
    """8 blocks compute (8 + 1) / 16 of the [T, T] products: the compiled FLOPs fall accordingly."""
    q, k, v, segments, _ = inputs(1, 1024, 2, 2, 64, 64)

    def flops(fn):
        return jax.jit(fn, static_argnums=4).lower(q, k, v, segments, 0.125).compile().cost_analysis()["flops"]

    def unblocked(q, k, v, segments, scale):  # every score, under the causal mask
        mask = attention_mask(segments, q.shape[1], causal=True)
        held = kv_cache.decode_layout(kv_cache.KVCache(k, v))
        return decode_attention(q, held.k_BxMxHxS, held.v_BxMxSxH, mask, scale)

    assert flops(causal_attention) < 0.6 * flops(unblocked)
