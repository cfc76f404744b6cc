"""Flash attention (openr1_jax_kernels.flash_attention): the Pallas TPU kernels in interpret mode equal the jnp
reference, output and the gradients of q, k and v, over causal and bidirectional attention, packed segment
layouts with padding, GQA and MLA head shapes (H != O), sequence lengths that need padding, and mixed block
sizes; the wrapper dispatches and pads as documented and rejects bad input with one clear error; and the kernels
compile ahead of time for real TPU generations at an MLA training shape."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openr1_jax_kernels import flash_attention as fa
from openr1_jax_kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_reference,
    flash_attention_with_lse_reference,
)
from openr1_jax_kernels.flash_attention import tpu as fa_tpu

from tests.kernels.conftest import needs_libtpu, tpu_compile

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The kernels and the float32 reference see the same (rounded) inputs; in float32 they differ only in summation
# order, in bfloat16 by the bf16 rounding of the probabilities before the PV matmul, of dS before the dq/dk
# matmuls, and of the outputs (8 mantissa bits). Errors are measured against the largest reference value.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
SMALL = BlockSizes(128, 128, 128, 128, 128, 128)  # several blocks (and skipped ones) even at T = 256
HEADS = [(1, 1), (2, 1), (4, 2), (3, 3), (4, 1)]  # (N, M): MHA, GQA with G = 2..4
HEAD_DIMS = [(32, 32), (48, 16), (16, 40)]  # (H, O): equal, MLA-like H > O, and H < O
SEGMENTS = ["none", "packed", "packed+padding", "scattered"]


def segment_layout(kind: str, B: int, T: int, seed: int) -> np.ndarray | None:
    """[B, T] int32: packed rows of 1-4 documents, optionally followed by padding (id 0, the model's), or ids
    drawn per token (segments that are not contiguous, which the mask must handle as well)."""
    rng = np.random.default_rng(seed)
    if kind == "none":
        return None
    if kind == "scattered":
        return rng.integers(0, 3, (B, T)).astype(np.int32)
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        used = T - (rng.integers(1, T // 2 + 1) if kind == "packed+padding" else 0)
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(rng.integers(0, 4), used - 1), replace=False))
        ids[b, :used] = 1 + np.searchsorted(cuts, np.arange(used), side="right")
    return ids


@st.composite
def cases(draw):
    return dict(
        B=draw(st.sampled_from([1, 2])),
        T=draw(st.sampled_from([64, 100, 128, 200, 256])),
        heads=draw(st.sampled_from(HEADS)),
        head_dims=draw(st.sampled_from(HEAD_DIMS)),
        causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        segments=draw(st.sampled_from(SEGMENTS)),
        blocks=BlockSizes(*draw(st.lists(st.sampled_from([128, 256]), min_size=6, max_size=6))),
        seed=draw(st.integers(0, 2**16)),
    )


def make_inputs(case):
    B, T, (N, M), (H, O) = case["B"], case["T"], case["heads"], case["head_dims"]
    keys = jax.random.split(jax.random.key(case["seed"]), 4)
    shapes = [(B, T, N, H), (B, T, M, H), (B, T, M, O), (B, T, N, O)]
    q, k, v, do = (jax.random.normal(key, s, jnp.float32).astype(DTYPES[case["dtype"]]) for key, s in zip(keys, shapes))
    segment_ids = segment_layout(case["segments"], B, T, case["seed"])
    return q, k, v, do, None if segment_ids is None else jnp.asarray(segment_ids)


def assert_close(actual, expected, dtype_name, what):
    assert actual.dtype == DTYPES[dtype_name], (what, actual.dtype, dtype_name)
    expected = np.asarray(expected, np.float32)
    tol = TOLERANCE[dtype_name]
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=tol, atol=tol * scale, err_msg=what)


# Interpret-mode kernels lower to large HLO loops whose XLA:CPU compile dominates these tests; the run itself is
# milliseconds, so skip the backend's optimisations (halves the compile time).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fwd_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


@functools.partial(jax.jit, static_argnames=("causal", "blocks"), compiler_options=FAST_COMPILE)
def kernel_fwd_and_grads(q, k, v, do, segment_ids, *, causal, blocks):
    """(out, dq, dk, dv) of the TPU kernels in interpret mode."""

    def kernel(q, k, v):
        return flash_attention(
            q, k, v, segment_ids, scale=q.shape[-1] ** -0.5, causal=causal, block_sizes=blocks, interpret=True
        )

    return fwd_and_grads(kernel, q, k, v, do)


@functools.partial(jax.jit, static_argnames=("causal",), compiler_options=FAST_COMPILE)
def reference_fwd_and_grads(q, k, v, do, segment_ids, *, causal):
    """(out, dq, dk, dv) of the reference on float32 copies of the inputs."""

    def reference(q, k, v):
        return flash_attention_reference(q, k, v, segment_ids, scale=q.shape[-1] ** -0.5, causal=causal)

    return fwd_and_grads(reference, *(x.astype(jnp.float32) for x in (q, k, v, do)))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=cases())
# MLA head dims, GQA, T = 100 padded to 128 inside packed rows with padding, causal, bf16
@example(case=dict(B=2, T=100, heads=(4, 2), head_dims=(48, 16), causal=True, dtype="bfloat16",
                   segments="packed+padding", blocks=SMALL, seed=1))  # fmt: skip
# bidirectional over packed rows, T = 200 padded to 256: the padded keys must stay invisible
@example(case=dict(B=1, T=200, heads=(4, 1), head_dims=(32, 32), causal=False, dtype="float32",
                   segments="packed", blocks=SMALL, seed=2))  # fmt: skip
# bidirectional without segment ids, T = 100: the wrapper must invent a segment for its padding
@example(case=dict(B=1, T=100, heads=(1, 1), head_dims=(32, 16), causal=False, dtype="float32",
                   segments="none", blocks=SMALL, seed=4))  # fmt: skip
# unequal blocks: forward 1 x 2, dq 2 x 1, dk/dv 2 x 2 (query x kv) blocks, skipped and diagonal ones mixed
@example(case=dict(B=1, T=256, heads=(2, 1), head_dims=(16, 40), causal=True, dtype="float32",
                   segments="none", blocks=BlockSizes(256, 128, 128, 256, 128, 128), seed=3))  # fmt: skip
def test_matches_reference(case):
    q, k, v, do, segment_ids = make_inputs(case)
    got = kernel_fwd_and_grads(q, k, v, do, segment_ids, causal=case["causal"], blocks=case["blocks"])
    want = reference_fwd_and_grads(q, k, v, do, segment_ids, causal=case["causal"])
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert_close(a, b, case["dtype"], name)


def test_saved_lse_matches_reference():
    """The backward's residual: the forward kernel's log-sum-exp of every query row (padding sliced off)."""
    case = dict(B=2, T=200, heads=(4, 2), head_dims=(32, 16), causal=True, dtype="float32", segments="packed", seed=9)
    q, k, v, _, segment_ids = make_inputs(case)
    blocks, T_padded = SMALL.fit(200)
    pad = [(0, 0), (0, T_padded - 200), (0, 0), (0, 0)]
    head_major = [jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v)]
    segments = jnp.pad(segment_ids, [(0, 0), (0, T_padded - 200)], constant_values=-1)
    kw = dict(scale=0.3, causal=True, block_sizes=blocks, interpret=True, save_lse=True)
    out, lse = jax.jit(lambda *a: fa_tpu._forward(*a, **kw), compiler_options=FAST_COMPILE)(*head_major, segments)
    want_out, want_lse = flash_attention_with_lse_reference(q, k, v, segment_ids, scale=0.3)
    np.testing.assert_allclose(out.transpose(0, 2, 1, 3)[:, :200], want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse[:, :, :200], want_lse, rtol=1e-5, atol=1e-5)


def test_dispatch():
    """ "xla" and "auto" off TPU run the reference; "auto" with interpret runs the TPU kernel; "gpu" pads T to a
    multiple of 128 with the padding in its own segment and slices the result back."""
    case = dict(B=1, T=72, heads=(2, 1), head_dims=(16, 16), causal=True, dtype="float32", segments="packed", seed=7)
    q, k, v, _, segment_ids = make_inputs(case)
    want = jax.jit(lambda q, k, v, s: flash_attention_reference(q, k, v, s, scale=0.25))(q, k, v, segment_ids)
    for implementation in ("xla", "auto"):
        got = jax.jit(lambda q, k, v, s, i=implementation: flash_attention(q, k, v, s, scale=0.25, implementation=i))
        np.testing.assert_array_equal(got(q, k, v, segment_ids), want)
    # gradients flow through platform_dependent's branches too
    grads = [
        jax.grad(lambda q, k, v, f=f: f(q, k, v, segment_ids, scale=0.25).sum(), argnums=(0, 1, 2))(q, k, v)
        for f in (flash_attention, flash_attention_reference)
    ]
    for got_grad, want_grad in zip(*grads):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    got = flash_attention(q, k, v, segment_ids, scale=0.25, block_sizes=SMALL, interpret=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    seen = {}

    def fake_gpu_kernel(q, k, v, segment_ids, *, scale, causal, interpret):
        seen.update(T=q.shape[1], dtype=segment_ids.dtype, pad=np.asarray(segment_ids[:, 72:]), interpret=interpret)
        return flash_attention_reference(q, k, v, segment_ids, scale=scale, causal=causal)

    gpu = fa._gpu  # the wrapper's GPU path (padding, slicing) with a stand-in for helper D's kernel
    got = gpu(fake_gpu_kernel, q, k, v, segment_ids, scale=0.25, causal=False, interpret=True)
    want = flash_attention_reference(q, k, v, segment_ids, scale=0.25, causal=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert seen["T"] == 128 and seen["dtype"] == jnp.int32 and seen["interpret"]
    assert (seen["pad"] == int(segment_ids.max()) + 1).all()


def test_block_sizes_fit():
    assert BlockSizes().fit(2048) == (BlockSizes(), 2048)
    assert SMALL.fit(100) == (SMALL, 128)
    # 512 shrinks to 384 (T rounded up to 128); 256 does not divide 384, so it shrinks to their gcd
    assert BlockSizes(512, 256, 512, 256, 256, 512).fit(300) == (BlockSizes(384, 128, 384, 128, 128, 384), 384)
    assert BlockSizes().fit(2049) == (BlockSizes(), 2560)  # padding stays under the largest block
    assert hash(SMALL) == hash(BlockSizes(128, 128, 128, 128, 128, 128))  # usable as a static argument


def test_bad_input_is_one_clear_error():
    q, k, v = jnp.zeros((2, 64, 4, 32)), jnp.zeros((2, 64, 2, 32)), jnp.zeros((2, 64, 2, 16))
    seg = jnp.zeros((2, 64), jnp.int32)
    cases = [
        (dict(q=q[0]), "q_BxTxNxH must be a 4-D array"),
        (dict(k=k.astype(jnp.bfloat16)), "must share one dtype"),
        (dict(q=q.astype(jnp.int32), k=k.astype(jnp.int32), v=v.astype(jnp.int32)), "bfloat16 or float32"),
        (dict(k=k[:, :32]), "batch and time must match"),
        (dict(v=jnp.zeros((2, 64, 1, 16))), "v_BxTxMxO has 1 heads but k_BxTxMxH has 2"),
        (dict(k=jnp.zeros((2, 64, 3, 32)), v=jnp.zeros((2, 64, 3, 16))), "multiple of k's and v's 3 heads"),
        (dict(k=jnp.zeros((2, 64, 2, 16))), "head dim 16 but q_BxTxNxH has 32"),
        (dict(segment_ids=seg[:, :10]), "segment_ids_BxT must be an integer array of shape (2, 64)"),
        (dict(segment_ids=seg.astype(jnp.float32)), "segment_ids_BxT must be an integer array"),
        (dict(scale=float("nan")), "scale must be a finite"),
        (dict(scale=jnp.float32(0.1)), "scale must be a finite"),
        (dict(causal=1), "causal must be a Python bool"),
        (dict(block_sizes=(128, 128)), "block_sizes must be a BlockSizes"),
        (dict(implementation="cuda"), "implementation must be one of"),
    ]
    for override, message in cases:
        kwargs = dict(q=q, k=k, v=v, segment_ids=seg, scale=0.1) | override
        args = [kwargs.pop(name) for name in ("q", "k", "v", "segment_ids")]
        with pytest.raises(ValueError, match=re.escape(message)):
            flash_attention(*args, **kwargs)
    with pytest.raises(ValueError, match=r"BlockSizes\.block_kv must be a positive multiple of 128, got 96"):
        BlockSizes(block_kv=96)
    with pytest.raises(ValueError, match=r"BlockSizes\.block_q must be a positive multiple of 128"):
        BlockSizes(block_q=0)


@needs_libtpu
@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
def test_compiles_for_tpu(generation, tpu_device):
    """An MLA training shape (B=1, T=2048, N=16, H=192, O=128, bf16, packed segments) compiles through Mosaic,
    forward alone and forward + backward, with memory and cost analyses (printed: pytest -s)."""
    B, T, N, H, O = 1, 2048, 16, 192, 128
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T, N, O), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    ]

    def forward(q, k, v, segment_ids):
        return flash_attention(q, k, v, segment_ids, scale=H**-0.5)

    def forward_backward(q, k, v, segment_ids):
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, segment_ids), q, k, v)
        return out, vjp(out)

    sharding = tpu_device(generation)
    for name, fn, kernels in (("fwd", forward, 1), ("fwd+bwd", forward_backward, 3)):
        compiled = tpu_compile(fn, *args, sharding=sharding)
        assert compiled.as_text().count("tpu_custom_call") >= kernels, name
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        # at least the causal half of the score and PV matmuls: the kernels' cost estimates reached XLA
        assert cost["flops"] >= B * N * T * T * (H + O) * (1 if name == "fwd" else 3), (name, cost["flops"])
        assert cost["bytes accessed"] > 0 and memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes >= 0
        print(
            f"{generation} {name}: flops {cost['flops']:.3e} bytes {cost['bytes accessed']:.3e} "
            f"transcendentals {cost.get('transcendentals', 0):.3e} | args {memory.argument_size_in_bytes} "
            f"out {memory.output_size_in_bytes} temp {memory.temp_size_in_bytes}"
        )
