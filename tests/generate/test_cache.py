"""The decode cache holds MLA's latent form: K + R values per token and layer, not per-head keys and values."""

import jax
import jax.numpy as jnp

from openr1_jax.models.kv_cache import (
    KVCache,
    LatentCache,
    cache_bytes_per_token_per_layer,
    full_kv_values_per_token_per_layer,
    prefix_lengths,
    shortest_prefix,
    values_per_token_per_layer,
)
from openr1_jax.models.params import abstract_model
from openr1_jax.models.presets import load_preset


def test_tiny_mla_cache_is_latent(mla_model):
    cfg = mla_model.config
    caches = mla_model.init_cache(batch=2, length=16)
    assert len(caches) == cfg.num_hidden_layers
    assert all(isinstance(c, LatentCache) for c in caches)
    K, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    assert cache_bytes_per_token_per_layer(caches[0]) == (K + R) * 4  # float32
    assert values_per_token_per_layer(cfg) == K + R


def test_deepseek_v3_cache_is_71x_smaller_than_full_kv():
    """576 values per token and layer (kv_lora_rank 512 + rope 64) vs 128 heads x (192 + 128) = 40,960."""
    cfg = load_preset("deepseek-v3-671b")
    model = abstract_model(cfg, dtype="bfloat16", param_dtype="bfloat16")
    caches = jax.eval_shape(lambda: model.init_cache(batch=1, length=8))
    assert cache_bytes_per_token_per_layer(caches[0]) == 576 * 2
    assert values_per_token_per_layer(cfg) == 576
    assert full_kv_values_per_token_per_layer(cfg) == 40_960
    assert full_kv_values_per_token_per_layer(cfg) // values_per_token_per_layer(cfg) == 71


def test_dense_cache_is_gqa(dense_model):
    attn = dense_model.config.attention_config()
    (cache, *_) = dense_model.init_cache(batch=1, length=4)
    assert isinstance(cache, KVCache)
    assert cache.k_BxSxMxH.shape == (1, 4, attn.num_kv_heads, attn.head_dim)
    assert cache.k_BxSxMxH.dtype == jnp.float32
    assert cache_bytes_per_token_per_layer(cache) == 2 * attn.num_kv_heads * attn.head_dim * 4


def test_a_decode_chunk_reads_the_shortest_prefix_that_holds_its_rows():
    assert prefix_lengths(512) == [64, 96, 128, 192, 256, 384, 512]
    assert prefix_lengths(100) == [64, 96, 100]
    assert prefix_lengths(48) == [48]
    for needed, expected in [(1, 64), (64, 64), (65, 96), (97, 128), (129, 192), (200, 256), (257, 384), (512, 512)]:
        assert shortest_prefix(needed, 512) == expected, needed
