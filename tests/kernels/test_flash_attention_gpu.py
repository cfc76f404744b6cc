"""The Pallas GPU (Triton) flash attention against the jnp reference: output and gradients.

On CPU the kernels run in the Pallas interpreter; on a CUDA machine the same tests run the compiled Triton kernels
(INTERPRET follows the backend). `test_lowers_to_triton_for_cuda` lowers fwd+bwd for CUDA on any machine, which
proves the kernels pass the Triton lowering (power-of-two tiles, the ops used) at the model's shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openr1_jax_kernels.flash_attention.gpu import BlockSizes, flash_attention_gpu
from openr1_jax_kernels.flash_attention.reference import flash_attention_reference

from tests.kernels.triton_checks import lower_for_cuda, rel_err

INTERPRET = jax.default_backend() != "gpu"
# ||kernel - reference|| / ||reference||: float32 runs IEEE products; bf16 rounds p and ds to bf16 before the dots.
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _segments(rng, layout, B, T):
    if layout == "none":
        return None
    if layout == "packed":  # contiguous documents, as packing makes them
        return np.sort(rng.integers(0, 4, (B, T)), axis=1).astype(np.int32)
    if layout == "padded":  # one document, then padding (id 0) that only sees itself
        real = rng.integers(T // 2, T, B)
        return (np.arange(T)[None, :] < real[:, None]).astype(np.int32)
    return rng.integers(0, 3, (B, T)).astype(np.int32)  # scattered: segments need not be contiguous


# Explicit cases first, so coverage does not depend on the draw: a split head dim (48 = 32 + 16) with GQA, padded
# rows, and segments that are not contiguous, in both dtypes and with and without causal masking.
@example(
    B=1, T=256, M=2, G=2, HO=(48, 32), causal=True, layout="scattered", dtype=jnp.bfloat16, blocks=(64, 32, 32, 16)
)
@example(B=2, T=128, M=1, G=2, HO=(48, 32), causal=False, layout="padded", dtype=jnp.float32, blocks=(32, 16, 16, 32))
@example(
    B=2, T=128, M=2, G=1, HO=(64, 16), causal=False, layout="scattered", dtype=jnp.bfloat16, blocks=(32, 16, 16, 32)
)
@settings(max_examples=5, deadline=None, derandomize=True)
@given(
    B=st.sampled_from([1, 2]),
    T=st.sampled_from([128, 256]),
    M=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2]),
    HO=st.sampled_from([(32, 32), (48, 32), (64, 16), (32, 48)]),
    causal=st.booleans(),
    layout=st.sampled_from(["none", "packed", "padded", "scattered"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    blocks=st.sampled_from([(32, 16, 16, 32), (64, 32, 32, 16), (128, 64, 64, 64)]),
)
def test_matches_reference(B, T, M, G, HO, causal, layout, dtype, blocks):
    H, O = HO
    N = M * G
    bq, bk, bq2, bk2 = blocks
    block_sizes = BlockSizes(block_q=bq, block_k=bk, block_q_dq=bq2, block_k_dq=bk2, block_q_dkv=bk2, block_k_dkv=bq2)
    rng = np.random.default_rng(B * 1000 + T + 10 * H + O)
    q, k, v, do = (
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((B, T, N, H), (B, T, M, H), (B, T, M, O), (B, T, N, O))
    )
    seg = _segments(rng, layout, B, T)  # every layout lets each query see at least itself
    seg = None if seg is None else jnp.asarray(seg)
    scale = H**-0.5

    def kernel(q, k, v, do):
        attn = lambda q, k, v: flash_attention_gpu(  # noqa: E731
            q, k, v, seg, scale=scale, causal=causal, interpret=INTERPRET, block_sizes=block_sizes
        )
        out, vjp = jax.vjp(attn, q, k, v)
        return out, *vjp(do)

    def reference(q, k, v, do):
        up = lambda x: x.astype(jnp.float32)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            attn = lambda q, k, v: flash_attention_reference(q, k, v, seg, scale=scale, causal=causal)  # noqa: E731
            out, vjp = jax.vjp(attn, up(q), up(k), up(v))
            return out, *vjp(up(do))

    got = jax.jit(kernel)(q, k, v, do)
    want = jax.jit(reference)(q, k, v, do)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.shape == ref.shape and x.dtype == dtype, name
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        err = rel_err(x, ref)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("H,O,N,M,with_segments", [(192, 128, 4, 4, True), (128, 128, 8, 2, False)])
def test_lowers_to_triton_for_cuda(H, O, N, M, with_segments):
    B, T = 1, 2048
    specs = [
        jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((B, T, N, H), (B, T, M, H), (B, T, M, O), (B, T, N, O))
    ]
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32) if with_segments else None

    def train(q, k, v, do, seg):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention_gpu(q, k, v, seg, scale=0.1, causal=True), q, k, v)
        return out, *vjp(do)

    text = lower_for_cuda(train, *specs, seg)
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_q"):
        BlockSizes(block_q=96)
    with pytest.raises(ValueError, match="block_k_dkv"):
        BlockSizes(block_k_dkv=8)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=3)
    with pytest.raises(ValueError, match="num_stages_bwd"):
        BlockSizes(num_stages_bwd=0)
    x = jnp.zeros((1, 100, 1, 32))
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention_gpu(x, x, x, None, scale=1.0, causal=True)
    x = jnp.zeros((1, 128, 1, 40))
    with pytest.raises(ValueError, match="multiples of 16"):
        flash_attention_gpu(x, x, x, None, scale=1.0, causal=True)
