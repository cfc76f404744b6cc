"""One process of the two-process test (tests/sharding/test_distributed.py): 4 CPU devices each, gloo
collectives, a sharded tiny-moe forward (fsdp=4 x expert=2, expert parallelism across the processes) on a
global batch assembled from host-local halves. Process 0 writes the gathered logits to argv[3].
The launcher sets JAX_PLATFORMS=cpu, XLA_FLAGS (4 devices) and the compile cache (tests/multihost/launch.py
child_env); importing this module changes nothing."""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from openr1_jax.models.presets import load_model_config
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.distributed import host_local_batch_to_global, initialize_distributed
from openr1_jax.sharding.init import create_sharded_model, merge_model
from openr1_jax.sharding.mesh import MeshConfig, make_mesh


def global_batch(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, vocab, (8, 8), dtype=np.int32)}


def main(port: str, process_id: str, out_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    assert initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    cfg = load_model_config("tiny-moe", {"num_hidden_layers": 2})
    mesh = make_mesh(MeshConfig(fsdp=4, expert=2))
    full = global_batch(cfg.vocab_size)
    half = {k: v[4 * jax.process_index() : 4 * (jax.process_index() + 1)] for k, v in full.items()}
    with sharding_context(mesh):
        graphdef, params, buffers = create_sharded_model(cfg, mesh, seed=0)
        batch = host_local_batch_to_global(half, mesh)
        forward = jax.jit(lambda p, b, ids: merge_model(graphdef, p, b)(ids).logits)
        logits = forward(params, buffers, batch["input_ids"])
    logits = multihost_utils.process_allgather(logits, tiled=True)
    if jax.process_index() == 0:
        np.save(out_path, np.asarray(logits))


if __name__ == "__main__":
    main(*sys.argv[1:])
