"""One full sharded SFT train step of a small MoE (MLA + DeepSeekMoE + MTP) with the Pallas kernels switched on
compiles for real TPU generations, ahead of time, on this CPU machine (libtpu's compiler, no TPU needed)."""

from __future__ import annotations

import pytest

from openr1_jax.models.presets import load_model_config
from openr1_jax.sharding.mesh import MeshConfig, make_mesh
from openr1_jax.train.aot import compile_sft_step
from tests.kernels.conftest import TPU_GENERATIONS, needs_libtpu, tpu_topology

pytestmark = [needs_libtpu, pytest.mark.slow]

# One decoder layer (dense FFN) + the MTP block (MoE): MLA, DeepSeekMoE and MTP at a third of the compile time.
SMALL_MOE = {"num_hidden_layers": 1, "vocab_size": 1024, "attention_impl": "pallas", "moe_impl": "pallas"}


@pytest.mark.parametrize("generation", sorted(TPU_GENERATIONS))
def test_sharded_sft_step_with_kernels_compiles_for_tpu(generation, no_persistent_cache):
    cfg = load_model_config("small-moe", SMALL_MOE)
    # 4 chips: parameters and batch over fsdp, heads / expert ffn over tensor; experts over `expert` on v5p.
    mesh_cfg = MeshConfig(fsdp=2, expert=2, tensor=1) if generation == "v5p" else MeshConfig(fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg, tpu_topology(generation).devices)
    step = compile_sft_step(cfg, mesh, batch_size=4, seq_len=512)
    hlo = step.compiled.as_text()
    assert "tpu_custom_call" in hlo  # the Mosaic kernels are in the program
    assert step.flops > 0 and step.bytes_accessed > 0
    assert 0 < step.peak_bytes < 16 * 2**30, step.memory  # fits any of these chips' HBM
    print(f"{generation}: {step.memory} flops/device {step.flops:.3e} bytes/device {step.bytes_accessed:.3e}")
