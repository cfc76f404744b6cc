"""Grouped matmul (openr1_jax_kernels.gmm): the Pallas TPU kernels in interpret mode equal jax.lax.ragged_dot,
forward and both gradients, over ragged, empty, single-group and short (sum < M) group layouts; the work schedule
covers every owned row exactly once; bad input gets one clear error; and the kernels compile for real TPU
generations ahead of time at DeepSeek-V3 expert shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openr1_jax_kernels.gmm import Tiling, gmm, gmm_reference, tgmm, tgmm_reference
from openr1_jax_kernels.gmm.tpu import make_schedule

from tests.kernels.conftest import needs_libtpu, tpu_compile

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The kernel accumulates in fp32 like the fp32 reference run on the same (rounded) inputs, so the only
# difference is summation order (fp32) or the final rounding of the output to bf16 (8 mantissa bits). Errors are
# measured against the largest reference value, as a sum of signed terms can land near zero.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}
SMALL = Tiling(tm=128, tk=128, tn=128)  # several tiles in every dimension even at these small shapes


@st.composite
def group_sizes(draw, M, G):
    """Sizes summing to M (ragged), to less than M (a tail of unowned rows), past M (clipped, as ragged_dot does),
    or all rows in one group."""
    layout = draw(st.sampled_from(["ragged", "short", "one_group", "over"]))
    if layout == "one_group":
        sizes = [0] * G
        sizes[draw(st.integers(0, G - 1))] = M
        return sizes
    used = {"ragged": M, "short": draw(st.integers(0, M - 1)), "over": M + draw(st.integers(1, 64))}[layout]
    # Weight 0 makes an empty group; the rest split the rows at arbitrary (not tile-aligned) boundaries.
    weights = np.array(draw(st.lists(st.integers(0, 3), min_size=G, max_size=G)))
    if weights.sum() == 0:
        weights[-1] = 1
    ends = (used * np.cumsum(weights)) // weights.sum()
    return np.diff(ends, prepend=0).tolist()


@st.composite
def cases(draw):
    """(M, K, N, G, dtype name, layouts): two group layouts per shape, since sizes are run-time values and a
    second layout reuses the compiled kernel (interpret-mode compiles are what these tests spend their time on)."""
    M = draw(st.integers(1, 512))
    G = draw(st.integers(1, 8))
    return (
        M,
        draw(st.sampled_from([128, 256])),
        draw(st.sampled_from([128, 256])),
        G,
        draw(st.sampled_from(sorted(DTYPES))),
        tuple(tuple(draw(group_sizes(M, G))) for _ in range(2)),
    )


def make_inputs(seed, shapes, dtype):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(keys, shapes)]


def assert_close(actual, expected, dtype_name):
    assert actual.dtype == DTYPES[dtype_name], (actual.dtype, dtype_name)
    expected = np.asarray(expected, np.float32)
    tol = TOLERANCE[dtype_name]
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=tol, atol=tol * scale)


@functools.partial(jax.jit, static_argnums=0)
def fwd_and_grads(gmm_fn, lhs_MxK, rhs_GxKxN, group_sizes_G, cotangent_MxN):
    out_MxN, vjp = jax.vjp(lambda lhs, rhs: gmm_fn(lhs, rhs, group_sizes_G), lhs_MxK, rhs_GxKxN)
    return (out_MxN, *vjp(cotangent_MxN))


interpreted_tpu_gmm = functools.partial(gmm, tiling=SMALL, implementation="tpu", interpret=True)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(case=cases())
# every row in one group with the others empty; then no row owned at all (zeros out, zero gradients)
@example(case=(256, 128, 256, 4, "bfloat16", ((0, 256, 0, 0), (0, 0, 0, 0))))
# empty groups with 80 unowned rows at the end; then group boundaries inside tiles, sizes summing to M
@example(case=(300, 256, 128, 5, "float32", ((70, 0, 130, 0, 20), (1, 127, 129, 0, 43))))
# K=200 > tk is zero-padded to 256, N=64 < tn is one full-width block, and M=77 rows take an 80-row bf16 tile.
@example(case=(77, 200, 64, 3, "bfloat16", ((30, 0, 40), (77, 0, 0))))
def test_gmm_forward_and_gradients_match_ragged_dot(case):
    M, K, N, G, dtype_name, layouts = case
    dtype = DTYPES[dtype_name]
    lhs_MxK, rhs_GxKxN, cotangent_MxN = make_inputs(M * G + K, [(M, K), (G, K, N), (M, N)], dtype)
    # The reference runs in fp32 on the same (bf16-rounded) values.
    lhs_f32, rhs_f32, cotangent_f32 = (x.astype(jnp.float32) for x in (lhs_MxK, rhs_GxKxN, cotangent_MxN))
    for sizes in layouts:
        group_sizes_G = jnp.asarray(sizes, jnp.int32)
        actual = fwd_and_grads(interpreted_tpu_gmm, lhs_MxK, rhs_GxKxN, group_sizes_G, cotangent_MxN)
        expected = fwd_and_grads(gmm_reference, lhs_f32, rhs_f32, group_sizes_G, cotangent_f32)
        for got, want in zip(actual, expected):
            assert_close(got, want, dtype_name)
        # Rows past sum(group_sizes) belong to no group: exactly zero, not merely close.
        assert not np.asarray(actual[0][sum(sizes) :], np.float32).any()


@settings(max_examples=4, deadline=None, derandomize=True)
@given(case=cases())
def test_tgmm_matches_reference_and_zeroes_empty_groups(case):
    M, K, N, G, dtype_name, layouts = case
    dtype = DTYPES[dtype_name]
    lhs_MxK, grad_MxN = make_inputs(M + G, [(M, K), (M, N)], dtype)
    for sizes in layouts:
        group_sizes_G = jnp.asarray(sizes, jnp.int32)
        actual = tgmm(
            lhs_MxK, grad_MxN, group_sizes_G, num_groups=G, tiling=SMALL, implementation="tpu", interpret=True
        )
        expected = tgmm_reference(lhs_MxK.astype(jnp.float32), grad_MxN.astype(jnp.float32), group_sizes_G)
        assert actual.shape == (G, K, N)
        assert_close(actual, expected, dtype_name)
        assert not np.asarray(actual, np.float32)[np.asarray(sizes) == 0].any()


def random_group_sizes(rng, batch, G, m):
    """Ragged sizes with empty groups, summing to m, to less than m, or past m (clipped by the kernels)."""
    weights = rng.integers(0, 4, (batch, G)) * (rng.random((batch, G)) < 0.7)
    totals = rng.choice([m, m // 2, 0, 2 * m], batch)[:, None]
    ends = totals * np.cumsum(weights, 1) // np.maximum(weights.sum(1, keepdims=True), 1)
    return np.diff(ends, prepend=0).astype(np.int32)


@pytest.mark.parametrize("for_tgmm", [False, True], ids=["gmm", "tgmm"])
@pytest.mark.parametrize(("tiles_m", "tm", "G"), [(1, 8, 1), (1, 16, 4), (5, 8, 3), (4, 128, 8)])
def test_schedule_covers_each_owned_row_once(tiles_m, tm, G, for_tgmm):
    m, batch = tiles_m * tm, 64
    sizes_BxG = random_group_sizes(np.random.default_rng(tiles_m * tm + G), batch, G, m)
    schedule = jax.jit(
        jax.vmap(lambda s: make_schedule(s, m, tm, visit_empty_groups=for_tgmm, cover_tail=not for_tgmm))
    )(sizes_BxG)
    owners, tiles, starts, ends, num_steps = (np.asarray(x) for x in schedule)
    for b in range(batch):
        n = int(num_steps[b])
        owner, tile = owners[b, :n], tiles[b, :n]
        assert 1 <= n <= tiles_m + G - 1
        assert (np.diff(tile) >= 0).all() and (np.diff(owner) >= 0).all()  # revisits are consecutive
        assert (owners[b, n:] == G + 1).all()  # spare steps differ from every real owner
        row_owner = np.searchsorted(np.minimum(np.cumsum(sizes_BxG[b]), m), np.arange(m), side="right")
        seen = np.zeros(m, int)
        for e, t in zip(owner, tile):
            rows = np.arange(m)[t * tm : (t + 1) * tm]
            rows = rows[(rows >= starts[b, e]) & (rows < ends[b, e])]
            assert (row_owner[rows] == e).all()
            seen[rows] += 1
        np.testing.assert_array_equal(seen, row_owner < G)  # rows no group owns (row_owner G) are never used
        if for_tgmm:  # every group, empty or not, gets a step that writes its output block
            assert set(owner) == set(range(G))
        else:  # every m-tile is written, including tiles no group owns
            assert set(tile) == set(range(tiles_m))


def test_auto_and_xla_use_ragged_dot_on_cpu():
    lhs_MxK, rhs_GxKxN = make_inputs(0, [(50, 128), (3, 128, 128)], jnp.float32)
    group_sizes_G = jnp.asarray([20, 0, 25], jnp.int32)
    expected = gmm_reference(lhs_MxK, rhs_GxKxN, group_sizes_G)
    for implementation in ("auto", "xla"):
        np.testing.assert_allclose(gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, implementation=implementation), expected)
    out = gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type=jnp.bfloat16, implementation="xla")
    assert out.dtype == jnp.bfloat16
    grads = jax.grad(lambda lhs: gmm(lhs, rhs_GxKxN, group_sizes_G).sum())(lhs_MxK)
    assert not np.asarray(grads[45:]).any()


def test_gpu_path_pads_rows_and_matches_reference():
    """The wrapper pads M to gpu.py's row multiple and slices back; run gpu.py's kernels in the interpreter."""
    pytest.importorskip("openr1_jax_kernels.gmm.gpu")
    lhs_MxK, rhs_GxKxN, cotangent_MxN = make_inputs(1, [(200, 128), (3, 128, 128), (200, 128)], jnp.float32)
    group_sizes_G = jnp.asarray([90, 0, 70], jnp.int32)

    interpreted_gpu_gmm = functools.partial(gmm, implementation="gpu", interpret=True)
    actual = fwd_and_grads(interpreted_gpu_gmm, lhs_MxK, rhs_GxKxN, group_sizes_G, cotangent_MxN)
    expected = fwd_and_grads(gmm_reference, lhs_MxK, rhs_GxKxN, group_sizes_G, cotangent_MxN)
    for got, want in zip(actual, expected):
        assert_close(got, want, "float32")
    drhs = tgmm(lhs_MxK, cotangent_MxN, group_sizes_G, num_groups=3, implementation="gpu", interpret=True)
    assert_close(drhs, expected[2], "float32")


def test_bad_input_raises_one_clear_error():
    lhs_MxK, rhs_GxKxN = jnp.zeros((64, 128)), jnp.zeros((4, 128, 256))
    sizes = jnp.asarray([16, 16, 16, 16], jnp.int32)
    cases = [
        (lambda: gmm(lhs_MxK[0], rhs_GxKxN, sizes), "lhs_MxK must be a 2-D"),
        (lambda: gmm(lhs_MxK, rhs_GxKxN[0], sizes), "rhs_GxKxN must be a 3-D"),
        (lambda: gmm(lhs_MxK, jnp.zeros((4, 256, 256)), sizes), "the contraction sizes must match"),
        (lambda: gmm(lhs_MxK, rhs_GxKxN, sizes[:3]), "length G=4"),
        (lambda: gmm(lhs_MxK, rhs_GxKxN, sizes.astype(jnp.float32)), "group_sizes_G must be an integer"),
        (lambda: gmm(lhs_MxK.astype(jnp.int32), rhs_GxKxN, sizes), "lhs_MxK must have a floating dtype"),
        (lambda: gmm(lhs_MxK, rhs_GxKxN, sizes, tiling=(128, 128, 128)), "tiling must be a gmm.Tiling"),
        (lambda: gmm(lhs_MxK, rhs_GxKxN, sizes, implementation="cuda"), "implementation must be one of"),
        (lambda: gmm(lhs_MxK, rhs_GxKxN, sizes, preferred_element_type=jnp.int8), "preferred_element_type"),
        (lambda: Tiling(tm=100), "Tiling.tm must be a positive multiple of 8"),
        (lambda: Tiling(tk=192), "Tiling.tk must be a positive multiple of 128"),
        (lambda: Tiling(tn=0), "Tiling.tn must be a positive multiple of 128"),
        (
            lambda: gmm(lhs_MxK.astype(jnp.bfloat16), rhs_GxKxN, sizes, tiling=Tiling(tm=8)),
            "Tiling.tm must be a multiple of 16 for bfloat16",
        ),
        (lambda: gmm(lhs_MxK, rhs_GxKxN, sizes, cost_rows=65), "cost_rows must be a Python int in"),
        (lambda: tgmm(lhs_MxK, jnp.zeros((32, 256)), sizes, num_groups=4), "both must hold the same rows"),
        (lambda: tgmm(lhs_MxK, jnp.zeros((64, 256)), sizes, num_groups=5), "length G=5 (num_groups)"),
        (lambda: tgmm(lhs_MxK, jnp.zeros((64, 256)), sizes, num_groups=0), "num_groups must be a positive"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


# DeepSeek-V3 expert shapes (hidden 7168, expert ffn 2048) with 32 local experts and 4096 routed tokens a device.
M, K, N, G = 4096, 7168, 2048, 32


@needs_libtpu
@pytest.mark.parametrize("generation", ["v5e", "v5p", "v6e"])
def test_compiles_for_tpu(generation, tpu_device):
    def forward(lhs_MxK, rhs_GxKxN, group_sizes_G):
        return gmm(lhs_MxK, rhs_GxKxN, group_sizes_G)

    def forward_and_backward(lhs_MxK, rhs_GxKxN, group_sizes_G, cotangent_MxN):
        return fwd_and_grads(gmm, lhs_MxK, rhs_GxKxN, group_sizes_G, cotangent_MxN)

    args = [
        jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
        jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16),
        jax.ShapeDtypeStruct((G,), jnp.int32),
        jax.ShapeDtypeStruct((M, N), jnp.bfloat16),
    ]
    sharding = tpu_device(generation)
    for name, fn, n_args, n_kernels in (("fwd", forward, 3, 1), ("fwd+bwd", forward_and_backward, 4, 3)):
        compiled = tpu_compile(fn, *args[:n_args], sharding=sharding)
        # gmm forward; then d lhs (gmm with rhs transposed) and d rhs (tgmm)
        assert compiled.as_text().count("tpu_custom_call") >= n_kernels
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        sizes = {k: getattr(memory, f"{k}_size_in_bytes") for k in ("argument", "output", "temp")}
        assert all(isinstance(v, int) and v >= 0 for v in sizes.values())
        # The kernels' CostEstimate reaches XLA: 2*M*K*N flops per matmul (one forward, two backward).
        assert cost["flops"] >= n_kernels * 2 * M * K * N
        assert cost["bytes accessed"] > 0
        print(f"gmm {generation} {name}: {sizes} flops={cost['flops']:.3e} bytes={cost['bytes accessed']:.3e}")


@needs_libtpu
def test_cost_rows_scale_the_declared_cost(tpu_device):
    """Expert parallelism hands gmm a buffer of which a device's groups own about 1/ep: with cost_rows the
    kernels (forward and both backward) declare the FLOPs of those rows, and fewer bytes, to XLA."""

    def forward_and_backward(cost_rows):
        return lambda lhs, rhs, sizes, cot: fwd_and_grads(
            functools.partial(gmm, cost_rows=cost_rows), lhs, rhs, sizes, cot
        )

    args = [
        jax.ShapeDtypeStruct((M, K), jnp.bfloat16),
        jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16),
        jax.ShapeDtypeStruct((G,), jnp.int32),
        jax.ShapeDtypeStruct((M, N), jnp.bfloat16),
    ]
    costs = {}
    for rows in (None, M // 8):
        compiled = tpu_compile(forward_and_backward(rows), *args, sharding=tpu_device("v5p"))
        cost = compiled.cost_analysis()
        costs[rows] = cost[0] if isinstance(cost, list | tuple) else cost
    full, eighth = costs[None], costs[M // 8]
    kernel_flops = 3 * 2 * M * K * N
    assert full["flops"] - eighth["flops"] == pytest.approx(kernel_flops * 7 / 8, rel=1e-3)
    assert eighth["bytes accessed"] < 0.65 * full["bytes accessed"]  # the weights and output writes remain
