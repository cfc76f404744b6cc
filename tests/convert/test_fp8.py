"""fp8 block (de)quantisation against an independent per-block loop and hand-computed values."""

import itertools

import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

from openr1_jax.convert.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8


def _blocks(shape, block):
    """Yield (grid index, row slice, col slice) for every block, edge blocks included."""
    for i, j in itertools.product(range(-(-shape[0] // block[0])), range(-(-shape[1] // block[1]))):
        yield (i, j), slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])


def _reference_dequantize(weight, scale_inv, block):
    out = np.zeros(weight.shape, np.float32)
    for (i, j), rows, cols in _blocks(weight.shape, block):
        out[rows, cols] = weight[rows, cols].astype(np.float32) * np.float32(scale_inv[i, j])
    return out


SHAPES = [(300, 200), (129, 1), (7, 130), (256, 128), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("in_dtype", [np.float32, ml_dtypes.bfloat16])
def test_round_trip_error_is_within_e4m3_precision(shape, in_dtype):
    rng = np.random.default_rng(0)
    # Mixed magnitudes per block so small values land in e4m3's subnormal range too.
    weight = (rng.standard_normal(shape) * np.exp(rng.uniform(-8, 2, shape))).astype(in_dtype)
    quantized, scale_inv = quantize_fp8(weight)
    assert quantized.dtype == FP8_DTYPE and quantized.shape == shape
    assert scale_inv.dtype == np.float32 and scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))

    restored = dequantize_fp8(quantized, scale_inv)
    exact = weight.astype(np.float32)
    error = np.abs(restored - exact)
    for (i, j), rows, cols in _blocks(shape, (128, 128)):
        block_max = np.abs(exact[rows, cols]).max()
        assert np.all(error[rows, cols] <= 2.0**-3 * block_max)
        # Tighter: 3 mantissa bits give half-ulp relative error 2^-4 for normals, and the
        # subnormal spacing 2^-9 (in units of the scale) bounds the rest; 1e-6 covers float32 ops.
        bound = 2.0**-4 * np.abs(exact[rows, cols]) + 2.0**-10 * scale_inv[i, j]
        assert np.all(error[rows, cols] <= bound * (1 + 1e-6))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", [np.float32, ml_dtypes.bfloat16])
def test_dequantize_equals_per_block_loop_exactly(shape, out_dtype):
    rng = np.random.default_rng(1)
    weight = rng.uniform(-448, 448, shape).astype(FP8_DTYPE)
    scale_inv = rng.uniform(1e-4, 1e-1, (-(-shape[0] // 128), -(-shape[1] // 128))).astype(np.float32)
    got = dequantize_fp8(weight, scale_inv, out_dtype=out_dtype)
    want = _reference_dequantize(weight, scale_inv, (128, 128)).astype(out_dtype)
    assert got.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    block=st.tuples(st.integers(1, 16), st.integers(1, 16)),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_block_matches_loop(rows, cols, block, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    quantized, scale_inv = quantize_fp8(weight, block)
    np.testing.assert_array_equal(
        dequantize_fp8(quantized, scale_inv, block), _reference_dequantize(quantized, scale_inv, block)
    )
    # Re-quantising what we dequantised reproduces the fp8 payload: the scales are stable.
    again, _ = quantize_fp8(dequantize_fp8(quantized, scale_inv, block), block)
    np.testing.assert_array_equal(again.view(np.uint8), quantized.view(np.uint8))


def test_power_of_two_scales_give_exact_values():
    # 3x3 weight, 2x2 blocks -> a 2x2 grid whose right column and bottom row are partial blocks.
    weight = np.array([[1.5, -2, 0.25], [448, 0, -0.5], [3, 6, -1]], np.float32).astype(FP8_DTYPE)
    scale_inv = np.array([[2, 0.5], [0.125, 8]], np.float32)
    expected = np.array(
        [
            [1.5 * 2, -2 * 2, 0.25 * 0.5],
            [448 * 2, 0 * 2, -0.5 * 0.5],
            [3 * 0.125, 6 * 0.125, -1 * 8],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(dequantize_fp8(weight, scale_inv, block=(2, 2)), expected)


def test_zero_block_gets_unit_scale():
    weight = np.zeros((130, 3), np.float32)
    weight[129, 0] = 7.0
    quantized, scale_inv = quantize_fp8(weight)
    np.testing.assert_array_equal(scale_inv, np.array([[1.0], [7.0 / 448]], np.float32))
    np.testing.assert_array_equal(dequantize_fp8(quantized, scale_inv), weight)


def test_bad_scale_shape_raises():
    weight = np.zeros((300, 200), FP8_DTYPE)
    with pytest.raises(ValueError, match=r"scale_inv shape \[2, 2\].*\[3, 2\] grid"):
        dequantize_fp8(weight, np.ones((2, 2), np.float32))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_fp8(np.zeros((4, 4), np.float32), np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="positive"):
        quantize_fp8(np.zeros((4, 4), np.float32), block=(0, 128))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_fp8(np.array([[1.0, np.inf]], np.float32))
