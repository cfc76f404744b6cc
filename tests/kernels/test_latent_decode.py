"""MLA absorbed decode attention (openr1_jax_kernels.latent_decode): the Pallas TPU kernel in interpret mode
equals the pure-jnp reference and the model's own XLA path over ragged batches, never touches cache blocks past
a row's end, and compiles for real TPU generations ahead of time."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openr1_jax_kernels.latent_decode import BlockSizes, latent_decode_attention, latent_decode_attention_reference
from openr1_jax_kernels.latent_decode.tpu import kv_block

from openr1_jax.models.kv_cache import visible_mask
from openr1_jax.models.mla import latent_attention
from tests.kernels.conftest import needs_libtpu, tpu_compile

R = 64
# bf16 rounds probabilities and the output (8 mantissa bits); the kernel rounds unnormalised probabilities where
# the reference rounds normalised ones, so they agree to a few bf16 ulps of outputs of size ~1.
TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_inputs(seed, B, T, N, K, S, q_dtype, cache_dtype):
    """Drawn and cast in numpy: jax.random would compile a program for every new shape."""
    rng = np.random.default_rng(seed)
    shapes = [((B, T, N, K), q_dtype), ((B, T, N, R), q_dtype), ((B, S, K), cache_dtype), ((B, S, R), cache_dtype)]
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype)) for shape, dtype in shapes)


def kernel(*args, block_s=128, **kw):
    return latent_decode_attention(*args, block_sizes=BlockSizes(block_s), implementation="tpu", interpret=True, **kw)


# Jitted, one program for both: op-by-op dispatch compiles every op for every new shape, several times slower.
@functools.partial(jax.jit, static_argnames="scale")
def expected(q_latent, q_rope, latent, k_rope, start_B, *, scale):
    """The package's reference and what MLA.decode runs without the kernel."""
    mask_BxTxS = visible_mask(start_B, q_latent.shape[1], latent.shape[1])
    positions_minor = jnp.swapaxes(latent, 1, 2), jnp.swapaxes(k_rope, 1, 2)  # as MLA.decode's XLA path holds it
    model = latent_attention(q_latent, q_rope, *positions_minor, mask_BxTxS, scale)
    return latent_decode_attention_reference(q_latent, q_rope, latent, k_rope, start_B, scale=scale), model


def assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **TOLERANCE[dtype])


F32, BF16 = jnp.float32, jnp.bfloat16
# (query dtype, cache dtype): fp32 activations over a bf16 cache happen too (the query is lifted, never the cache).
DTYPES = [(F32, F32), (BF16, BF16), (F32, BF16)]


@st.composite
def cases(draw):
    T = draw(st.integers(1, 3))
    S = draw(st.sampled_from([128, 256, 384]))
    start = st.one_of(st.integers(0, S - T), st.sampled_from([0, S - T]))  # ragged, plus both extremes
    return dict(
        T=T,
        S=S,
        N=draw(st.integers(1, 8)),
        K=draw(st.sampled_from([128, 256])),
        block_s=draw(st.sampled_from([128, 256])),
        dtypes=draw(st.sampled_from(DTYPES)),
        start_B=draw(st.lists(start, min_size=1, max_size=4)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=7, deadline=None, derandomize=True)
@given(case=cases())
# Always run: rows ending in each of three blocks (the last one partial with block_s=256), every dtype pairing.
@example(case=dict(T=2, S=384, N=4, K=128, block_s=128, dtypes=(F32, BF16), start_B=[0, 130, 382], seed=0))
@example(case=dict(T=3, S=384, N=8, K=256, block_s=128, dtypes=(BF16, BF16), start_B=[381, 0, 200, 127], seed=1))
@example(case=dict(T=1, S=384, N=3, K=128, block_s=256, dtypes=(F32, F32), start_B=[383, 255, 1, 0], seed=2))
def test_kernel_matches_reference_and_model(case):
    T, S, N, K, block_s, (q_dtype, cache_dtype) = (case[k] for k in ("T", "S", "N", "K", "block_s", "dtypes"))
    start_B = jnp.asarray(case["start_B"], jnp.int32)
    B = start_B.shape[0]
    args = make_inputs(case["seed"], B, T, N, K, S, q_dtype, cache_dtype)
    scale = (K + R) ** -0.5

    out = kernel(*args, start_B, scale=scale, block_s=block_s)
    assert out.shape == (B, T, N, K)
    reference, model = expected(*args, start_B, scale=scale)
    assert_close(out, reference, cache_dtype)
    assert_close(out, model, cache_dtype)


def test_never_reads_past_visible_length():
    """NaN everywhere past each row's last new token (start_B[b] + T - 1): the output stays finite and equal to
    the clean cache's, so the kernel neither computes on those positions nor lets them leak into the sums."""
    B, T, N, K, S = 4, 2, 4, 128, 320  # blocks of 128: the last one partial, undefined past the cache's end
    start_B = jnp.array([0, 127, 200, S - T], jnp.int32)  # ends in block 0, at a block's start, mid-block, last
    q_latent, q_rope, latent, k_rope = make_inputs(0, B, T, N, K, S, jnp.float32, jnp.float32)
    past_end_Bx1xS = (jnp.arange(S)[None, :] > (start_B + T - 1)[:, None])[:, :, None]
    poisoned = jnp.where(past_end_Bx1xS, jnp.nan, latent), jnp.where(past_end_Bx1xS, jnp.nan, k_rope)

    out = kernel(q_latent, q_rope, *poisoned, start_B, scale=0.1)
    assert np.isfinite(np.asarray(out)).all()
    reference, _ = expected(q_latent, q_rope, latent, k_rope, start_B, scale=0.1)
    assert_close(out, reference, jnp.float32)


def test_blocks_past_a_rows_end_are_not_fetched():
    """The cache index map repeats a row's last needed block, which the TPU pipeline turns into no DMA."""
    S, T, block_s = 1000, 2, 128  # 8 blocks, the last one partial
    start_B = jnp.array([0, 126, 127, 500, 998, 5000], jnp.int32)  # 5000: out of range, still clamped in bounds
    for b, last_block in enumerate([0, 0, 1, 3, 7, 7]):
        blocks = [int(kv_block(b, s, start_B, new_tokens=T, length=S, block_s=block_s)) for s in range(8)]
        assert blocks == [min(s, last_block) for s in range(8)]


def test_dispatch():
    args = make_inputs(1, 2, 1, 2, 128, 256, jnp.float32, jnp.float32)
    start_B = jnp.array([3, 200], jnp.int32)
    reference = latent_decode_attention_reference(*args, start_B, scale=0.5)
    for implementation in ("auto", "xla", "gpu"):  # on CPU "auto" is the reference; there is no GPU kernel
        out = latent_decode_attention(*args, start_B, scale=0.5, implementation=implementation)
        np.testing.assert_array_equal(out, reference)
    # interpret=True with "auto" is the TPU kernel in the interpreter; "auto" alone keeps the kernel only in the
    # TPU branch, which a CPU lowering drops.
    jaxpr = str(jax.make_jaxpr(lambda *a: latent_decode_attention(*a, scale=0.5, interpret=True))(*args, start_B))
    assert "pallas_call" in jaxpr and "platform_index" not in jaxpr
    lowered = jax.jit(lambda *a: latent_decode_attention(*a, scale=0.5)).lower(*args, start_B).as_text()
    assert "tpu_custom_call" not in lowered


def test_wrapper_errors():
    q_latent, q_rope, latent, k_rope = make_inputs(0, 2, 1, 2, 128, 256, jnp.float32, jnp.float32)
    start_B = jnp.zeros((2,), jnp.int32)

    def call(*, ql=q_latent, qr=q_rope, lat=latent, kr=k_rope, start=start_B, **kw):
        return latent_decode_attention(ql, qr, lat, kr, start, **{"scale": 0.1, **kw})

    with pytest.raises(ValueError, match="q_latent must be"):
        call(ql=q_latent[0])
    with pytest.raises(ValueError, match="latent must be a floating dtype"):
        call(lat=latent.astype(jnp.int32))
    with pytest.raises(ValueError, match="q_rope's"):
        call(qr=q_rope[:, :, :1])
    with pytest.raises(ValueError, match="latent must be"):
        call(lat=latent[:, :, :64])
    with pytest.raises(ValueError, match="k_rope must be"):
        call(kr=k_rope[:, :128])
    with pytest.raises(ValueError, match="k_rope's dtype"):
        call(kr=k_rope.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="q_rope's dtype"):
        call(qr=q_rope.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="new tokens"):
        call(ql=jnp.zeros((2, 300, 2, 128)), qr=jnp.zeros((2, 300, 2, R)))
    with pytest.raises(ValueError, match="start_B must be"):
        call(start=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="start_B must be"):
        call(start=jnp.zeros((2,), jnp.float32))
    with pytest.raises(ValueError, match="scale must be"):
        call(scale=float("nan"))
    with pytest.raises(ValueError, match="implementation must be"):
        call(implementation="cuda")
    with pytest.raises(ValueError, match="block_sizes must be"):
        call(block_sizes=128)
    for bad in (0, 100, 256.0):
        with pytest.raises(ValueError, match=r"block_sizes\.block_s"):
            BlockSizes(bad)
    assert hash(BlockSizes(256)) == hash(BlockSizes(256))  # a static jit argument


# DeepSeek-V3 decode: 128 heads over the 512-wide latent and 64-wide rope key, 8k cache, bf16.
V3 = dict(B=8, T=1, N=128, K=512, S=8192)


@needs_libtpu
@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
def test_compiles_for_tpu(generation, tpu_device, record_property):
    B, T, N, K, S = V3.values()
    bf16 = jnp.bfloat16
    shapes = [((B, T, N, K), bf16), ((B, T, N, R), bf16), ((B, S, K), bf16), ((B, S, R), bf16), ((B,), jnp.int32)]
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    compiled = tpu_compile(
        lambda *a: latent_decode_attention(*a, scale=(192**-0.5)), *args, sharding=tpu_device(generation)
    )
    assert "tpu_custom_call" in compiled.as_text()

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    record_property("memory_analysis", str(memory))
    record_property("cost_analysis", {k: cost[k] for k in ("flops", "bytes accessed", "transcendentals")})
    print(generation, memory, {k: cost[k] for k in ("flops", "bytes accessed", "transcendentals")})
    # The kernel's own estimate reaches XLA's cost model: every position scored (K + R) and accumulated (K).
    assert cost["flops"] == 2 * B * T * N * S * (K + R) + 2 * B * T * N * S * K
    # k_rope is read in the layout XLA already keeps it in: no per-call relayout copy of the cache.
    assert memory.temp_size_in_bytes < B * S * R * 2
