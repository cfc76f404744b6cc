"""Scanned layers (`scan_layers`) against the unrolled model built from the same seed: the same values, the same
forward pass, training step (MoE statistics and router-bias updates included), cached decoding and checkpoints."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openr1_jax.convert.checkpoint import param_metadata, save_model
from openr1_jax.models.load import load_model
from openr1_jax.models.params import build_model, flat_variables
from openr1_jax.models.presets import load_model_config
from openr1_jax.models.scan import stack_flat, unstack_flat
from openr1_jax.train.step import StepConfig
from tests.models.test_properties import TINY_DENSE, TINY_MOE
from tests.train.test_step import SGD, _packed_batch, _run

SCANNED = TINY_MOE.replace(num_hidden_layers=4, scan_layers=True)  # a dense stack of 1, a MoE stack of 3


def values(model) -> dict[str, np.ndarray]:
    return {name: np.asarray(var.value) for name, var in flat_variables(model).items()}


def keyed(tree) -> dict[str, np.ndarray]:
    """A state dict's leaves keyed by dotted path (list indices as numbers)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v) for path, v in leaves}


def test_layer_groups_are_the_runs_of_alike_layers():
    assert SCANNED.layer_groups() == [range(0, 1), range(1, 4)]
    assert TINY_DENSE.layer_groups() == [range(0, TINY_DENSE.num_hidden_layers)]
    assert TINY_MOE.replace(first_k_dense_replace=0).layer_groups() == [range(0, 3)]
    assert list(unstack_flat({"layer_stacks.1.mlp.router.kernel": np.zeros(3)}, SCANNED)) == [
        f"layers.{i}.mlp.router.kernel" for i in (1, 2, 3)
    ]


@pytest.mark.parametrize("cfg", [SCANNED, TINY_DENSE.replace(scan_layers=True)], ids=["moe", "dense"])
def test_scanned_model_holds_the_unrolled_values_and_computes_the_same(cfg):
    scanned, unrolled = build_model(cfg, seed=1), build_model(cfg.replace(scan_layers=False), seed=1)
    stacked = values(scanned)
    assert stacked["layer_stacks.0.input_norm.scale"].shape[0] == cfg.layer_groups()[0].stop
    per_layer = unstack_flat(stacked, cfg)
    expected = values(unrolled)
    assert sorted(per_layer) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(per_layer[name], value, err_msg=name)
    restacked = stack_flat(dict(per_layer), cfg)
    assert sorted(restacked) == sorted(stacked)
    for name, value in stacked.items():
        np.testing.assert_array_equal(restacked[name], value, err_msg=name)
    # The stacked axis is named, so the sharding rules keep it whole.
    var = flat_variables(scanned)["layer_stacks.0.input_norm.scale"]
    assert var.get_metadata()["out_sharding"] == ("layers", "norm")

    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    a, b = nnx.jit(lambda m: m(ids))(scanned), nnx.jit(lambda m: m(ids))(unrolled)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    assert len(a.mtp_logits) == len(b.mtp_logits) == cfg.num_nextn_predict_layers
    for x, y in zip(a.mtp_logits, b.mtp_logits):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_scanned_step_equals_unrolled_step():
    """One SFT step (2 micro-batches, full remat, MTP loss, balance loss, router-bias update): the scanned
    model's parameters, biases and metrics after the step are the unrolled model's."""
    cfg = load_model_config("tiny-moe").replace(num_hidden_layers=4, remat="full")
    step_cfg = StepConfig(gradient_accumulation_steps=2, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
    batch = _packed_batch()
    runs = {scan: _run(build_model(cfg.replace(scan_layers=scan), seed=3), SGD, step_cfg, batch) for scan in (0, 1)}
    (_, unrolled, unrolled_metrics), (before, scanned, scanned_metrics) = runs[0], runs[1]
    assert before.params["layer_stacks"][1]["mlp"]["experts"]["gate_proj"].shape[0] == 3
    for tree in ("params", "buffers"):
        expected = keyed(getattr(unrolled, tree))
        got = unstack_flat(keyed(getattr(scanned, tree)), cfg.replace(scan_layers=True))
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, atol=1e-6, err_msg=name)
    # Every MoE layer's bias moved (each by its own layer's load) and the load metrics average the same layers.
    old, new = (keyed(s.buffers)["layer_stacks.1.mlp.router.e_score_correction_bias"] for s in (before, scanned))
    assert np.all(np.any(old != new, axis=-1))
    assert set(scanned_metrics) == set(unrolled_metrics)
    for name, value in unrolled_metrics.items():
        np.testing.assert_allclose(scanned_metrics[name], value, rtol=1e-5, err_msg=name)


def test_scanned_model_decodes_like_the_unrolled():
    scanned, unrolled = build_model(SCANNED, seed=2), build_model(SCANNED.replace(scan_layers=False), seed=2)

    @nnx.jit
    def prefill_then_decode(model, ids, lengths, next_ids):
        h, caches = model.prefill(ids, lengths, model.init_cache(ids.shape[0], 16))
        h2, caches = model.decode(next_ids, lengths, caches)
        return model.head(h), model.head(h2), caches

    ids = jnp.asarray([[5, 9, 3, 7, 1, 0], [2, 8, 0, 0, 0, 0]])
    args = (ids, jnp.asarray([5, 2]), jnp.asarray([[4], [6]]))
    for a, b in zip(
        jax.tree.leaves(prefill_then_decode(scanned, *args)), jax.tree.leaves(prefill_then_decode(unrolled, *args))
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_checkpoints_hold_one_entry_per_layer(tmp_path):
    """A scanned model saves per-layer names (what converters and unscanned models read) and loads back
    stacked, bit for bit; the same checkpoint loads unscanned too."""
    scanned = build_model(SCANNED, seed=4)
    save_model(scanned, tmp_path / "ckpt")
    names = set(param_metadata(tmp_path / "ckpt"))
    assert "layers.3.mlp.experts.gate_proj" in names and not any(n.startswith("layer_stacks") for n in names)

    again = load_model(tmp_path / "ckpt")
    assert again.config.scan_layers
    for name, value in values(scanned).items():
        np.testing.assert_array_equal(values(again)[name], value, err_msg=name)
    unrolled = load_model(tmp_path / "ckpt", scan_layers=False)
    per_layer = unstack_flat(values(scanned), SCANNED)
    for name, value in values(unrolled).items():
        np.testing.assert_array_equal(per_layer[name], value, err_msg=name)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
