"""The Pallas GPU (Triton) grouped matmuls against jax.lax.ragged_dot: gmm, its gradients, and tgmm.

On CPU the kernels run in the Pallas interpreter; on a CUDA machine the same tests run the compiled Triton kernels
(INTERPRET follows the backend). Group sizes are drawn ragged, with empty groups and rows past their sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openr1_jax_kernels.gmm.gpu import GmmTiling, TgmmTiling, gmm_gpu, tgmm_gpu
from openr1_jax_kernels.gmm.reference import gmm_reference, tgmm_reference

from tests.kernels.triton_checks import lower_for_cuda, rel_err

INTERPRET = jax.default_backend() != "gpu"
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative to ||reference||


@st.composite
def group_sizes(draw, M):
    """G sizes summing to at most M, some of them zero; the first or last group may be empty too."""
    G = draw(st.integers(1, 6))
    total = draw(st.sampled_from([M, M - 1, draw(st.integers(0, M))]))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=G - 1, max_size=G - 1)))
    sizes = np.diff([0, *cuts, total])
    for g in draw(st.lists(st.integers(0, G - 1), max_size=2)):  # force empty groups
        sizes[g] = 0
    return np.asarray(sizes, np.int32)


def _check(got, want, dtype):
    for name, x, ref in zip(("out", "dlhs", "drhs"), got, want):
        assert x.shape == ref.shape, name
        err = rel_err(x, ref)  # an all-zero reference (no rows owned) needs an all-zero result
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    data=st.data(),
    M=st.sampled_from([128, 256]),
    K=st.sampled_from([16, 48, 64]),
    N=st.sampled_from([16, 40, 64]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    tiles=st.sampled_from([(32, 16, 32, 3), (64, 32, 16, 1), (128, 64, 64, 8)]),
)
def test_gmm_matches_ragged_dot(data, M, K, N, dtype, tiles):
    sizes = data.draw(group_sizes(M))
    G = len(sizes)
    tm, tk, tn, group_m = tiles
    tiling = GmmTiling(tm=tm, tk=tk, tn=tn, group_m=group_m)
    tgmm_tiling = TgmmTiling(tm=tn, tk=tk, tn=tm)
    rng = np.random.default_rng(M + K + N + G)
    lhs, rhs, dout = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((M, K), (G, K, N), (M, N)))
    gs = jnp.asarray(sizes)

    def kernel(lhs, rhs, dout):
        f = lambda x, w: gmm_gpu(x, w, gs, interpret=INTERPRET, tiling=tiling, tgmm_tiling=tgmm_tiling)  # noqa: E731
        out, vjp = jax.vjp(f, lhs, rhs)
        return out, *vjp(dout)

    def reference(lhs, rhs, dout):
        up = lambda x: x.astype(jnp.float32)  # noqa: E731
        with jax.default_matmul_precision("highest"):
            out, vjp = jax.vjp(lambda x, w: gmm_reference(x, w, gs), up(lhs), up(rhs))
            return out, *vjp(up(dout))

    got = jax.jit(kernel)(lhs, rhs, dout)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    # Rows past sum(group_sizes) are exactly zero, in the output and in dlhs.
    assert not np.any(np.asarray(got[0], np.float32)[sizes.sum() :])
    assert not np.any(np.asarray(got[1], np.float32)[sizes.sum() :])
    _check(got, jax.jit(reference)(lhs, rhs, dout), dtype)


def test_tgmm_and_preferred_element_type():
    rng = np.random.default_rng(0)
    M, K, N = 256, 48, 32
    sizes = np.array([0, 70, 0, 100, 3, 0], np.int32)  # empty first, middle and last groups; 83 rows unowned
    lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    dout = jnp.asarray(rng.standard_normal((M, N)), jnp.bfloat16)
    gs = jnp.asarray(sizes)
    got = tgmm_gpu(lhs, dout, gs, len(sizes), preferred_element_type=jnp.float32, interpret=INTERPRET)
    with jax.default_matmul_precision("highest"):
        want = tgmm_reference(lhs.astype(jnp.float32), dout.astype(jnp.float32), gs, num_groups=len(sizes))
    assert got.dtype == jnp.float32 and got.shape == (len(sizes), K, N)
    assert not np.any(np.asarray(got)[[0, 2, 5]])
    assert rel_err(got, want) < 1e-5
    rhs = jnp.asarray(rng.standard_normal((len(sizes), K, N)), jnp.bfloat16)
    out = gmm_gpu(lhs, rhs, gs, preferred_element_type=jnp.float32, interpret=INTERPRET)
    with jax.default_matmul_precision("highest"):
        want = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs)
    assert out.dtype == jnp.float32 and rel_err(out, want) < 1e-5


def test_lowers_to_triton_for_cuda():
    specs = [
        jax.ShapeDtypeStruct((4096, 7168), jnp.bfloat16),
        jax.ShapeDtypeStruct((256, 7168, 2048), jnp.bfloat16),  # > 4 GiB: 64-bit offsets
        jax.ShapeDtypeStruct((256,), jnp.int32),
        jax.ShapeDtypeStruct((4096, 2048), jnp.bfloat16),
    ]

    def train(lhs, rhs, gs, dout):
        out, vjp = jax.vjp(lambda x, w: gmm_gpu(x, w, gs), lhs, rhs)
        return out, *vjp(dout)

    text = lower_for_cuda(train, *specs)
    assert text.count("__gpu$xla.gpu.triton") == 3  # gmm, gmm on rhs transposed (dlhs), tgmm (drhs)


def test_bad_tilings():
    with pytest.raises(ValueError, match="tm"):
        GmmTiling(tm=96)
    with pytest.raises(ValueError, match="tk"):
        GmmTiling(tk=8)
    with pytest.raises(ValueError, match="num_warps"):
        TgmmTiling(num_warps=5)
    with pytest.raises(ValueError, match="group_m"):
        GmmTiling(group_m=0)
    with pytest.raises(ValueError, match="group_sizes_G"):
        tgmm_gpu(jnp.zeros((128, 16)), jnp.zeros((128, 16)), jnp.zeros((3,), jnp.int32), 4)
