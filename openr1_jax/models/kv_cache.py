"""Decode caches, one per attention layer, preallocated to a fixed length S (static shapes under jit).

MLA caches only what its absorbed decode reads (DeepSeek-V2 report, section 2.1.3): the normed KV latent
c_KV [B, S, K] and the rotated shared rope key k_rope [B, S, R], K + R values per token and layer (576 for
DeepSeek-V3) instead of the 2 N H_qk-ish values of a full per-head key/value cache (40,960 for V3: 128 heads x
(192 key + 128 value)). Dense students (GQA) cache keys and values per kv head, [B, S, M, H] each.

Rows are independent: row b holds its own number of valid entries, and new entries are written at each row's
own offset, so one batch mixes prompts of different lengths (a ragged batch) without any left padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


LayerCache = LatentCache | KVCache


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
    return sum(a.dtype.itemsize * a.size // (a.shape[0] * a.shape[1]) for a in jax.tree.leaves(cache))


def write(cache_BxSx_: jax.Array, new_BxTx_: jax.Array, start_B: jax.Array) -> jax.Array:
    """Row b's T new entries go to positions start_B[b] .. start_B[b] + T - 1."""

    def one_row(cache_Sx_, new_Tx_, start):
        return jax.lax.dynamic_update_slice_in_dim(cache_Sx_, new_Tx_.astype(cache_Sx_.dtype), start, axis=0)

    return jax.vmap(one_row)(cache_BxSx_, new_BxTx_, start_B)


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
