"""Decode caches, one per attention layer, preallocated to a fixed length S (static shapes under jit).

MLA caches only what its absorbed decode reads (DeepSeek-V2 report, section 2.1.3): the normed KV latent
c_KV [B, S, K] and the rotated shared rope key k_rope [B, S, R], K + R values per token and layer (576 for
DeepSeek-V3) instead of the 2 N H_qk-ish values of a full per-head key/value cache (40,960 for V3: 128 heads x
(192 key + 128 value)). Dense students (GQA) cache keys and values per kv head, [B, S, M, H] each.

Rows are independent: row b holds its own number of valid entries, and new entries are written at each row's
own offset, so one batch mixes prompts of different lengths (a ragged batch) without any left padding.

A decode loop holds them in another layout (`DecodeLatentCache`, `DecodeKVCache`), converted once per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from openr1_jax.models.config import GQAConfig, MLAConfig, ModelConfig


@struct.dataclass
class LatentCache:
    """MLA: the compressed latent c_KV (after its RMSNorm) and the shared rope key (after RoPE)."""

    latent_BxSxK: jax.Array
    k_rope_BxSxR: jax.Array


@struct.dataclass
class KVCache:
    """GQA: keys (after RoPE) and values per kv head."""

    k_BxSxMxH: jax.Array
    v_BxSxMxH: jax.Array


# A decode loop holds each cache in the layout its products read as plain matrix products (keys positions-minor,
# [.., H, S], so scores are [R, H] x [H, S]; values positions-major per head), converted once per chunk of steps
# (`decode_layout`, `storage_layout`). Read positions-major, every step's score product repacks the whole cache as
# its transposed operand, and GQA's head-major products copied both caches every step (bench/README.md).


@struct.dataclass
class DecodeLatentCache:
    """A LatentCache positions-minor, [B, K, S] and [B, R, S]. c_KV is both key and value: its value product,
    c_KV^T probs^T, then has the small probs as its transposed operand rather than the cache."""

    latent_BxKxS: jax.Array
    k_rope_BxRxS: jax.Array


@struct.dataclass
class DecodeKVCache:
    """A KVCache head-major: keys positions-minor [B, M, H, S], values [B, M, S, H]."""

    k_BxMxHxS: jax.Array
    v_BxMxSxH: jax.Array


LayerCache = LatentCache | KVCache | DecodeLatentCache | DecodeKVCache


# Each storage layout's decode-loop twin, and where each of its arrays' storage axes go there (one permutation per
# field; the way back and the position axis are derived from it).
_DECODE_AXES = {
    LatentCache: (DecodeLatentCache, ((0, 2, 1), (0, 2, 1))),
    KVCache: (DecodeKVCache, ((0, 2, 3, 1), (0, 2, 1, 3))),
}


def decode_layout(cache: LayerCache) -> DecodeLatentCache | DecodeKVCache:
    if type(cache) not in _DECODE_AXES:
        return cache
    held, axes = _DECODE_AXES[type(cache)]
    return held(*(a.transpose(order) for a, order in zip(jax.tree.leaves(cache), axes, strict=True)))


def storage_layout(cache: LayerCache) -> LatentCache | KVCache:
    for stored, (held, axes) in _DECODE_AXES.items():
        if isinstance(cache, held):
            back = [tuple(int(i) for i in np.argsort(order)) for order in axes]
            return stored(*(a.transpose(order) for a, order in zip(jax.tree.leaves(cache), back, strict=True)))
    return cache


def in_layout_of(cache: LayerCache, like: LayerCache) -> LayerCache:
    """`cache` in the layout `like` is held in."""
    return decode_layout(cache) if isinstance(like, DecodeLatentCache | DecodeKVCache) else storage_layout(cache)


def write_entries(cache: LayerCache, new: LatentCache | KVCache, start_B: jax.Array) -> LayerCache:
    """`write` for a whole layer cache in either layout: `new` holds T positions per row in the storage layout
    and lands at positions start_B[b] .. start_B[b] + T - 1 of `cache`, which keeps its layout."""
    held = next((axes for h, axes in _DECODE_AXES.values() if isinstance(cache, h)), None)
    position_axes = [1] * len(jax.tree.leaves(new)) if held is None else [order.index(1) for order in held]
    arrays = zip(jax.tree.leaves(cache), jax.tree.leaves(in_layout_of(new, cache)), position_axes, strict=True)
    return type(cache)(*(write(a, n, start_B, axis=axis - 1) for a, n, axis in arrays))


def init_layer_cache(cfg: MLAConfig | GQAConfig, batch: int, length: int, dtype) -> LayerCache:
    if isinstance(cfg, MLAConfig):
        return LatentCache(
            jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
            jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype),
        )
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def values_per_token_per_layer(cfg: ModelConfig) -> int:
    """Numbers the cache stores per token and layer (multiply by the dtype's size for bytes)."""
    attn = cfg.attention_config()
    if isinstance(attn, MLAConfig):
        return attn.kv_lora_rank + attn.qk_rope_head_dim
    return 2 * attn.num_kv_heads * attn.head_dim


def full_kv_values_per_token_per_layer(cfg: ModelConfig) -> int:
    """What a per-head key/value cache of the same model would store: N (qk head dim + v head dim) for MLA."""
    attn = cfg.attention_config()
    if isinstance(attn, MLAConfig):
        return attn.num_heads * (attn.qk_nope_head_dim + attn.qk_rope_head_dim + attn.v_head_dim)
    return 2 * attn.num_kv_heads * attn.head_dim


def cache_bytes_per_token_per_layer(cache: LayerCache) -> int:
    """Bytes one token occupies in one layer's cache, read off the arrays themselves."""
    return sum(a.dtype.itemsize * a.size // (a.shape[0] * a.shape[1]) for a in jax.tree.leaves(storage_layout(cache)))


def write(cache_Bx_: jax.Array, new_Bx_: jax.Array, start_B: jax.Array, axis: int = 0) -> jax.Array:
    """Row b's T new entries (laid out as the cache is, T along `axis` of a row) go to positions start_B[b] ..
    start_B[b] + T - 1 along that axis."""

    def one_row(cache_row, new_row, start):
        return jax.lax.dynamic_update_slice_in_dim(cache_row, new_row.astype(cache_row.dtype), start, axis=axis)

    return jax.vmap(one_row)(cache_Bx_, new_Bx_, start_B)


def visible_mask(start_B: jax.Array, new_tokens: int, length: int) -> jax.Array:
    """[B, T, S]: new token t of row b (at position start_B[b] + t) sees cache positions s <= its own."""
    query_pos_BxT = start_B[:, None] + jnp.arange(new_tokens)[None, :]
    return jnp.arange(length)[None, None, :] <= query_pos_BxT[:, :, None]


def prefix_lengths(length: int, smallest: int = 64) -> list[int]:
    """The cache prefixes a decode chunk may attend over: powers of two from `smallest` and the halfway points
    between them (64, 96, 128, 192, ...), then the whole; a chunk reads at most 1.5x what its rows need."""
    sizes = []
    size = smallest
    while size < length:
        sizes += [s for s in (size, size * 3 // 2) if s < length]
        size *= 2
    return [*sizes, length]


def shortest_prefix(needed: int, length: int) -> int:
    """The shortest of `prefix_lengths(length)` that holds `needed` positions (at most `length`)."""
    return next((size for size in prefix_lengths(length) if size >= needed), length)
