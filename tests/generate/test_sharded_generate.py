"""Generation on 8 simulated CPU devices equals single-device generation, reading the training layout as is."""

import jax
import numpy as np
import pytest

from openr1_jax.generate import Engine, SamplingParams
from openr1_jax.generate.engine import _decode
from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_preset
from openr1_jax.sharding.init import create_sharded_model
from openr1_jax.sharding.mesh import MeshConfig, make_mesh

PROMPTS = [[5, 17, 300, 42, 9], [8], [400, 1, 2, 3], [33, 44, 55, 66, 77, 88, 99], [7, 7], [100, 200, 300]]


def outputs(engine: Engine, params: SamplingParams):
    outs = engine.generate(PROMPTS, params)
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(fsdp=2, expert=4)])
def test_sharded_generation_equals_single_device(mesh_cfg, tokenizer):
    cfg = load_preset("tiny-moe").replace(vocab_size=512)
    mesh = make_mesh(mesh_cfg)
    graphdef, params, buffers = create_sharded_model(cfg, mesh, seed=0)
    sharded = Engine.from_state(graphdef, params, buffers, cfg, tokenizer, mesh=mesh, max_batch_size=8, chunk_size=8)
    single = Engine(build_model(cfg, seed=0), tokenizer, max_batch_size=8, chunk_size=8)

    for params_ in (
        SamplingParams(temperature=0, max_new_tokens=10),
        SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2, seed=3),
    ):
        got, want = outputs(sharded, params_), outputs(single, params_)
        for got_rows, want_rows in zip(got, want, strict=True):
            for (g_tokens, g_lp, g_fin), (w_tokens, w_lp, w_fin) in zip(got_rows, want_rows, strict=True):
                assert g_tokens == w_tokens and g_fin == w_fin
                np.testing.assert_allclose(g_lp, w_lp, atol=1e-4)

    # The engine holds the train state's arrays themselves, and its compiled decode takes them in their
    # training shardings: nothing is copied or resharded on the way in.
    assert sharded.params is params
    emb = params["embed"]["embedding"]
    assert len(emb.sharding.device_set) == 8
    used = {k: v for k, v in sharded.params.items() if k != "mtp"}  # decoding never runs the MTP module (pruned)
    state_in = jax.tree.leaves(used)
    compiled = _decode.lower(
        sharded.graph,
        sharded.params,
        sharded.buffers,
        sharded_state(sharded),
        steps=sharded.chunk_size,
        prefix=32,
    ).compile()
    param_shardings = jax.tree.leaves(compiled.input_shardings[0][0])
    assert all(s.is_equivalent_to(a.sharding, a.ndim) for s, a in zip(param_shardings, state_in, strict=True))


def sharded_state(engine: Engine):
    """An empty decode state of the engine's shapes, built as the engine builds it."""
    from openr1_jax.generate.engine import _empty_state
    from openr1_jax.sharding.context import sharding_context

    with sharding_context(engine.mesh, engine.rules):
        return _empty_state(engine.graph, engine.params, engine.buffers, slots=8, cache_len=32, max_new=16, num_stop=1)
