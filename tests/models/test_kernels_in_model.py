"""The whole model with the Pallas kernels switched on (the TPU kernels, run by the Pallas interpreter on CPU)
equals the model on its XLA paths: training forward and every gradient (flash attention, grouped matmul),
packed rows with padding, and cached generation (prefill + ragged decode over the MLA latent cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_model_config
from tests.sharding.conftest import loss_and_grads

KERNELS = {"attention_impl": "pallas_interpret", "moe_impl": "pallas_interpret"}


def _models(preset: str, **overrides):
    """The same weights twice: XLA paths and kernels."""
    cfg = load_model_config(preset, overrides)
    reference = build_model(cfg, seed=0)
    for layer in (*reference.layers, *(m.block for m in reference.mtp)):
        if hasattr(layer.mlp, "router"):  # a trained-looking bias so selection differs from the gate scores
            bias = layer.mlp.router.e_score_correction_bias
            bias.value = jax.random.normal(jax.random.key(7), bias.value.shape) * 0.05
    kernels = build_model(cfg.replace(**KERNELS), seed=0)
    nnx.update(kernels, nnx.state(reference))
    return reference, kernels


def _packed_batch(vocab: int, B: int = 2, T: int = 40):
    rng = np.random.default_rng(0)
    segment_ids = np.where(np.arange(T) < rng.integers(8, T - 8, size=(B, 1)), 1, 2).astype(np.int32)
    segment_ids[:, -3:] = 0  # padding
    return {"input_ids": rng.integers(0, vocab, (B, T), dtype=np.int32), "segment_ids": segment_ids}


def _close(actual, expected, tol):
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_loss_and_gradients_match_xla(preset):
    reference, kernels = _models(preset, num_hidden_layers=2)
    batch = _packed_batch(reference.config.vocab_size)
    results = []
    for model in (reference, kernels):
        graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        (loss, stats), grads = jax.jit(loss_and_grads, static_argnums=2)(
            params.to_pure_dict(), buffers.to_pure_dict(), graphdef, batch
        )
        results.append((loss, stats, grads))
    (loss, stats, grads), (k_loss, k_stats, k_grads) = results
    np.testing.assert_allclose(k_loss, loss, rtol=1e-5)
    _close(k_stats, stats, 1e-5)
    _close(k_grads, grads, 2e-5)


def test_cached_generation_matches_xla():
    """Prefill (flash attention over the prompt) + decode steps (the latent decode kernel) on a ragged batch,
    one and two new tokens per step."""
    reference, kernels = _models("tiny-moe", num_hidden_layers=2)
    rng = np.random.default_rng(1)
    B, T, S, V = 3, 12, 160, reference.config.vocab_size
    prompt = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    lengths = jnp.asarray([12, 5, 9], jnp.int32)
    new_tokens = [jnp.asarray(rng.integers(0, V, (B, n)), jnp.int32) for n in (1, 2, 1)]
    outputs = []
    for model in (reference, kernels):
        hidden, caches = model.prefill(prompt, lengths, model.init_cache(B, S))
        steps, start = [hidden[jnp.arange(B), lengths - 1]], lengths
        for new in new_tokens:
            hidden, caches = model.decode(new, start, caches)
            steps.append(hidden)
            start = start + new.shape[1]
        outputs.append(steps)
    for ref, ker in zip(*outputs, strict=True):
        np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), atol=2e-5, rtol=2e-5)
