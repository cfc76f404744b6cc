"""Two local processes (gloo CPU collectives, 4 devices each) run a sharded, expert-parallel tiny-moe forward
on a global batch built from host-local halves; the result equals the single-process forward."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from openr1_jax.errors import UserError
from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_model_config
from openr1_jax.sharding.distributed import initialize_distributed
from tests.multihost.launch import ROOT, child_env, free_port
from tests.sharding.distributed_worker import global_batch


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "logits.npy"
    port = str(free_port())
    env = child_env(4)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.sharding.distributed_worker", port, str(i), str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    cfg = load_model_config("tiny-moe", {"num_hidden_layers": 2})
    ids = global_batch(cfg.vocab_size)["input_ids"]
    model = build_model(cfg, seed=0)
    expected = jax.jit(lambda ids: model(ids).logits)(ids)
    np.testing.assert_allclose(np.load(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_single_process_is_a_no_op():
    assert initialize_distributed(env={}) is False
    assert (
        initialize_distributed(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"})
        is False
    )


@pytest.mark.parametrize(
    "env,message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "needs all of"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "not in \\[0, 2\\)"),
        ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ],
)
def test_bad_environment_is_a_user_error(env, message):
    with pytest.raises(UserError, match=message):
        initialize_distributed(env=env)
