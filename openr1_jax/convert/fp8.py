"""Block-scaled float8 weights, as stored by the official DeepSeek-V3 / R1 checkpoints.

A quantised linear weight W [R, C] is stored as ``weight`` (float8_e4m3fn, [R, C]) plus
``weight_scale_inv`` (float32, [ceil(R/128), ceil(C/128)]): one scale per 128x128 block, edge
blocks partial. Despite its name, ``scale_inv`` multiplies: W = float32(weight) * scale_inv, the
same as ``weight_dequant`` in DeepSeek-V3's inference code.

Both directions work one block-row at a time, so the only temporaries besides the output are one
[128, C] float32 slab and a [C] scale vector: converting a 7168x18432 expert never holds a second
full-size float32 copy.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import numpy.typing as npt

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"block must be two positive sizes (rows, cols), got {block}.")
    return int(block[0]), int(block[1])


def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Number of (row, col) blocks covering a 2-D shape, counting partial edge blocks."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize_fp8(
    weight: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int] = (128, 128),
    out_dtype: npt.DTypeLike = np.float32,
) -> np.ndarray:
    """W = float32(weight) * scale_inv broadcast over its block, cast to ``out_dtype`` at the end.

    Multiplying in float32 and casting once matches DeepSeek's reference bit for bit.
    """
    block = _check_block(block)
    if weight.ndim != 2 or weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be a 2-D float8_e4m3fn array, got {weight.dtype}{list(weight.shape)}.")
    grid = _grid(weight.shape, block)
    if scale_inv.shape != grid:
        raise ValueError(
            f"scale_inv shape {list(scale_inv.shape)} does not match weight shape {list(weight.shape)}: "
            f"{block[0]}x{block[1]} blocks need a {list(grid)} grid."
        )
    rows, cols = weight.shape
    scale_inv = scale_inv.astype(np.float32)
    out = np.empty((rows, cols), out_dtype)
    for i in range(grid[0]):
        slab = slice(i * block[0], (i + 1) * block[0])
        # One scale per column of this block-row; the slab is small, so the repeat is too.
        col_scale = np.repeat(scale_inv[i], block[1])[:cols]
        out[slab] = weight[slab].astype(np.float32) * col_scale
    return out


def quantize_fp8(weight: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Quantise a 2-D float weight to (float8_e4m3fn weight, float32 scale_inv), one scale per block.

    scale_inv = amax(|block|) / 448 so each block's largest value maps to e4m3's largest finite
    value; all-zero blocks get scale 1 so that dequantising never divides zero by zero.
    """
    block = _check_block(block)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {list(weight.shape)}.")
    rows, cols = weight.shape
    grid = _grid(weight.shape, block)
    col_starts = np.arange(0, cols, block[1])
    quantized = np.empty((rows, cols), FP8_DTYPE)
    scale_inv = np.empty(grid, np.float32)
    for i in range(grid[0]):
        slab = slice(i * block[0], (i + 1) * block[0])
        values = weight[slab].astype(np.float32)
        # Column-wise max, then the max over each block's columns: the per-block amax.
        amax = np.maximum.reduceat(np.abs(values).max(axis=0), col_starts)
        if not np.all(np.isfinite(amax)):
            raise ValueError(f"weight rows {slab.start}..{min(slab.stop, rows) - 1} hold inf or nan.")
        scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
        scale_inv[i] = scale
        # Clipping guards the rare case where amax/448*448 rounds a hair above 448 in float32.
        scaled = values / np.repeat(scale, block[1])[:cols]
        quantized[slab] = np.clip(scaled, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return quantized, scale_inv
