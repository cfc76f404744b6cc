"""Rotary position embedding: default, linear, YaRN (DeepSeek) and Llama 3 frequencies, two pair layouts.

The frequency formulas follow transformers' `modeling_rope_utils` exactly (the parity tests depend on it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from openr1_jax.models.config import RopeConfig, yarn_mscale


def rope_frequencies(cfg: RopeConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [R/2] and the factor that scales cos/sin (YaRN's attention factor, else 1)."""
    dim, base = cfg.head_dim, cfg.theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = 1.0 / (np.float32(base) ** exponents)
    if cfg.type == "default":
        return inv_freq, 1.0
    if cfg.type == "linear":
        return inv_freq / np.float32(cfg.factor), 1.0
    if cfg.type == "llama3":
        return _llama3(inv_freq, cfg), 1.0
    return _yarn(exponents, cfg)


def _llama3(inv_freq: np.ndarray, cfg: RopeConfig) -> np.ndarray:
    old_len = cfg.original_max_position_embeddings
    low_wavelen = old_len / cfg.low_freq_factor
    high_wavelen = old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(exponents: np.ndarray, cfg: RopeConfig) -> tuple[np.ndarray, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, blend linearly in between."""
    dim, base, factor = cfg.head_dim, cfg.theta, cfg.factor
    attention_factor = cfg.attention_factor
    if attention_factor is None:
        if cfg.mscale and cfg.mscale_all_dim:
            attention_factor = yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = cfg.beta_fast or 32, cfg.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** exponents
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions_BxT: jax.Array, cfg: RopeConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, [B, T, R/2], in float32."""
    inv_freq, scale = rope_frequencies(cfg)
    angles = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x_BxTxNxR: jax.Array, cos_BxTxR2: jax.Array, sin_BxTxR2: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate pairs (x1, x2) by the angle: (x1 cos - x2 sin, x2 cos + x1 sin).

    Interleaved (DeepSeek) pairs are (x[2i], x[2i+1]); half-split (Llama/Qwen) pairs are (x[i], x[i + R/2]).
    Either way the result is returned half-split, as transformers does; queries and keys share the layout,
    so their dot products equal those of the original layout.
    """
    if interleaved:
        x1, x2 = x_BxTxNxR[..., 0::2], x_BxTxNxR[..., 1::2]
    else:
        half = x_BxTxNxR.shape[-1] // 2
        x1, x2 = x_BxTxNxR[..., :half], x_BxTxNxR[..., half:]
    cos = cos_BxTxR2[:, :, None, :].astype(x_BxTxNxR.dtype)
    sin = sin_BxTxR2[:, :, None, :].astype(x_BxTxNxR.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
