"""The blocked grouped matmul equals `jax.lax.ragged_dot`, forward and gradients, for ragged, empty and partial
groups and every block size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from openr1_jax.models.blocked_matmul import blocked_ragged_dot

M, K, N, G = 40, 8, 6, 5


@st.composite
def group_sizes(draw):
    """G sizes summing to at most M: some empty, some larger than a block, sometimes leaving rows unrouted."""
    sizes = draw(st.lists(st.integers(0, M), min_size=G, max_size=G))
    total = draw(st.integers(0, M))
    scaled = np.floor(np.asarray(sizes, np.float64) * total / max(sum(sizes), 1)).astype(np.int32)
    return scaled


@functools.partial(jax.jit, static_argnums=(0,))
def _value_and_grads(block, x, w, gs, dy):
    """(y, loss, dx, dw) of both implementations; block 0 = ragged_dot."""

    def forward(x, w):
        return jax.lax.ragged_dot(x, w, gs) if block == 0 else blocked_ragged_dot(x, w, gs, block)

    y = forward(x, w)
    loss, grads = jax.value_and_grad(lambda x, w: (forward(x, w) * dy).sum(), argnums=(0, 1))(x, w)
    return y, loss, *grads


@settings(max_examples=25, deadline=None)
@given(sizes=group_sizes(), block=st.sampled_from([1, 4, 8, 64]), seed=st.integers(0, 2**16))
def test_blocked_equals_ragged_dot_forward_and_gradients(sizes, block, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((G, K, N)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    gs = jnp.asarray(sizes)
    ours, ref = _value_and_grads(block, x, w, gs, dy), _value_and_grads(0, x, w, gs, dy)
    for got, want in zip(ours, ref, strict=True):  # y, loss, d x, d w
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_unrouted_rows_and_dtype():
    x = jnp.ones((6, 2), jnp.bfloat16)
    w = jnp.ones((2, 2, 3), jnp.bfloat16)
    y = blocked_ragged_dot(x, w, jnp.array([2, 1]), block=2)
    assert y.dtype == jnp.bfloat16 and y.shape == (6, 3)
    np.testing.assert_array_equal(np.asarray(y, np.float32), [[2] * 3] * 3 + [[0] * 3] * 3)
