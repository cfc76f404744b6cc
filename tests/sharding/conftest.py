"""Shared by the sharding tests: tiny-moe (float32), a packed batch, and the loss the sharded runs must match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_model_config
from openr1_jax.sharding.init import merge_model, split_model

# Two decoder layers (dense, MoE) + the MTP block (MoE): every kind of block, at 2/3 of the compile time.
OVERRIDES = {"num_hidden_layers": 2}


def token_ce(logits_BxTxV, ids_BxT, segment_ids_BxT, depth):
    """Mean CE of position i predicting token i + depth within its segment (the MTP heads use depth > 1)."""
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-depth].astype(jnp.float32))
    target = ids_BxT[:, depth:]
    weight = (segment_ids_BxT[:, depth:] == segment_ids_BxT[:, :-depth]) & (segment_ids_BxT[:, depth:] != 0)
    ce = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
    return jnp.sum(ce * weight) / jnp.sum(weight)


def loss_fn(params, buffers, graphdef, batch):
    """Token CE of the main head plus the MTP heads; the sown MoE statistics come back as aux."""
    model = merge_model(graphdef, params, buffers)
    out = model(batch["input_ids"], segment_ids=batch["segment_ids"])
    loss = token_ce(out.logits, batch["input_ids"], batch["segment_ids"], 1)
    for k, mtp in enumerate(out.mtp_logits, start=1):
        loss = loss + token_ce(mtp, batch["input_ids"], batch["segment_ids"], 1 + k)
    stats = nnx.pop(model, nnx.Intermediate).to_pure_dict()
    return loss, stats


loss_and_grads = jax.value_and_grad(loss_fn, has_aux=True)


@pytest.fixture(scope="session")
def tiny_moe():
    """(config, graphdef, params, buffers, batch, ((loss, stats), grads)) computed on one device."""
    cfg = load_model_config("tiny-moe", OVERRIDES)
    model = build_model(cfg, seed=0)
    # A non-zero router bias (as after training) so expert selection differs from the gate scores.
    for layer in (*model.layers, *(m.block for m in model.mtp)):
        if hasattr(layer.mlp, "router"):
            bias = layer.mlp.router.e_score_correction_bias
            bias.value = jax.random.normal(jax.random.key(7), bias.value.shape) * 0.05
    graphdef = nnx.graphdef(model)
    _, params, buffers = split_model(model)
    rng = np.random.default_rng(0)
    B, T = 8, 16
    segment_ids = np.where(np.arange(T) < rng.integers(4, T, size=(B, 1)), 1, 2).astype(np.int32)
    segment_ids[:, -2:] = 0  # padding
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32), "segment_ids": segment_ids}
    reference = jax.jit(loss_and_grads, static_argnums=2)(params, buffers, graphdef, batch)
    return cfg, graphdef, params, buffers, batch, reference
