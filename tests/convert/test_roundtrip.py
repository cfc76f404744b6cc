"""HF -> openr1-jax -> HF: bitwise-identical tensors, and the export loads in transformers with equal logits."""

import json

import numpy as np
import pytest
import torch
import transformers

from openr1_jax import load_model
from openr1_jax.convert.hf_to_jax import convert_hf_to_jax
from openr1_jax.convert.jax_to_hf import convert_jax_to_hf
from openr1_jax.convert.safetensors_io import SafetensorsReader
from tests.hf_models import hf_config, random_hf_model, torch_logits

CASES = {
    "deepseek_v3": dict(n_group=2, topk_group=1, first_k_dense_replace=1),
    "deepseek_v2": dict(q_lora_rank=None, first_k_dense_replace=1),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama": dict(num_key_value_heads=2),
}


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise_and_loads_in_transformers(arch, dtype, tmp_path):
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "export"
    model = random_hf_model(hf_config(arch, **CASES[arch]))
    model.to(dtype).save_pretrained(src, max_shard_size="20KB")  # several shards + index
    assert (src / "model.safetensors.index.json").exists()

    convert_hf_to_jax(src, ckpt, progress=False)
    convert_jax_to_hf(ckpt, out, max_shard_bytes=30_000, progress=False)

    with SafetensorsReader(src) as a, SafetensorsReader(out) as b:
        assert a.names() == b.names()
        for name in a.names():
            x, y = a.get(name), b.get(name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), f"{name} changed in the round trip"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    # Reference: the source folder loaded fresh (a model cast in memory would also have cast its rope buffers).
    original = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(0, 96, (2, 9))
    expected = torch_logits(original, ids)
    np.testing.assert_array_equal(torch_logits(reloaded, ids), expected)
    if dtype == torch.float32:
        assert np.abs(np.asarray(load_model(ckpt)(ids).logits) - expected).max() <= 1e-4


def test_checkpoint_restores_into_a_mesh(tmp_path):
    """`load_model(..., mesh=...)` lays parameters out by their logical axes and computes the same logits."""
    import jax
    from jax.sharding import Mesh

    src, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    model = random_hf_model(hf_config("deepseek_v3", **CASES["deepseek_v3"]))
    model.save_pretrained(src)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("fsdp", "expert", "tensor"))
    convert_hf_to_jax(src, ckpt, mesh=mesh, progress=False)

    sharded = load_model(ckpt, mesh=mesh)
    assert sharded.layers[1].mlp.experts.gate_proj.value.sharding.spec[0] == "expert"
    ids = np.random.RandomState(0).randint(0, 96, (2, 9))
    expected = torch_logits(model, ids)
    np.testing.assert_allclose(np.asarray(sharded(ids).logits), expected, atol=1e-4)

    # Scanned: the per-layer entries of the checkpoint (and of the HF folder) are stacked on the mesh, the
    # stacked "layers" axis whole and the rest laid out as before.
    for source in (ckpt, src):
        scanned = load_model(source, mesh=mesh, scan_layers=True)
        assert scanned.layer_stacks[1].mlp.experts.gate_proj.value.sharding.spec[:2] == (None, "expert")
        np.testing.assert_allclose(np.asarray(scanned(ids).logits), expected, atol=1e-4)
