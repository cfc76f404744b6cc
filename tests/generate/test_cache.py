"""The decode cache holds MLA's latent form: K + R values per token and layer, not per-head keys and values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openr1_jax.models import kv_cache
from openr1_jax.models.kv_cache import (
    DecodeKVCache,
    DecodeLatentCache,
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


@pytest.mark.parametrize("kind", ["latent", "kv"])
def test_the_decode_layout_holds_the_same_entries_positions_minor(kind):
    """A decode loop's layout (keys positions-minor) converts back exactly, holds the same bytes per token, and a
    write into it at each row's own offset lands where the same write into the storage layout does."""
    rng = np.random.default_rng(0)
    B, S, T = 3, 10, 2
    if kind == "latent":
        cache = LatentCache(*(jnp.asarray(rng.normal(size=(B, S, d)), jnp.float32) for d in (6, 2)))
    else:
        cache = KVCache(*(jnp.asarray(rng.normal(size=(B, S, 2, 3)), jnp.float32) for _ in range(2)))
    held = kv_cache.decode_layout(cache)
    if kind == "latent":
        assert isinstance(held, DecodeLatentCache)
        assert held.latent_BxKxS.shape == (B, 6, S) and held.k_rope_BxRxS.shape == (B, 2, S)
    else:
        assert isinstance(held, DecodeKVCache)
        assert held.k_BxMxHxS.shape == (B, 2, 3, S) and held.v_BxMxSxH.shape == (B, 2, S, 3)
    assert kv_cache.decode_layout(held) is held and kv_cache.storage_layout(cache) is cache
    jax.tree.map(np.testing.assert_array_equal, kv_cache.storage_layout(held), cache)
    assert cache_bytes_per_token_per_layer(held) == cache_bytes_per_token_per_layer(cache)

    start_B = jnp.asarray([0, 4, 8])
    new = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=(B, T, *a.shape[2:])), jnp.float32), cache)
    want = jax.tree.map(lambda a, n: kv_cache.write(a, n, start_B), cache, new)
    got = kv_cache.write_entries(held, new, start_B)
    assert type(got) is type(held)
    jax.tree.map(np.testing.assert_array_equal, kv_cache.write_entries(cache, new, start_B), want)
    jax.tree.map(np.testing.assert_array_equal, kv_cache.storage_layout(got), want)
