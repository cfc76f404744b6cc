"""Checkpointing: round trips, keep-last-K, sharded restore, kill -9 mid-save, SIGTERM, two processes."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from openr1_jax.errors import UserError
from openr1_jax.train.checkpointing import CheckpointConfig, Checkpointer, PreemptionGuard

REPO = Path(__file__).resolve().parents[2]
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


@flax.struct.dataclass
class _State:  # the contract's TrainState fields
    step: jax.Array
    params: dict
    buffers: dict
    opt_state: optax.OptState
    rng: jax.Array


def _make_state(seed: int = 0) -> _State:
    k = jax.random.PRNGKey(seed)
    params = {"embed": jax.random.normal(k, (16, 8)), "layers": {"0": {"w": jnp.full((8, 8), seed, jnp.float32)}}}
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
    return _State(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        buffers={"layers": {"0": {"bias": jnp.arange(4, dtype=jnp.float32)}}},
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)),
    )


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return env


def test_config_validation():
    with pytest.raises(UserError, match="save_steps"):
        CheckpointConfig(save_steps=-1)
    with pytest.raises(UserError, match="save_total_limit"):
        CheckpointConfig(save_total_limit=0)


def test_round_trip_state_meta_and_data_iterator(tmp_path):
    state = _make_state(3)
    it = _iterator()
    consumed = [next(it) for _ in range(7)]
    with Checkpointer(tmp_path / "checkpoints", CheckpointConfig(save_steps=5, async_save=True)) as ckpt:
        assert ckpt.latest_step() is None
        assert not ckpt.maybe_save(3, state, it)  # not due
        assert ckpt.maybe_save(5, state, it, meta={"config": {"lr": 1e-3, "name": "x"}, "tokens": 123})
        # The iterator moves on while the async save may still be committing: the saved state must not.
        expected_next = [next(it) for _ in range(10)]
        ckpt.wait()
        assert ckpt.latest_step() == 5
        step_dir = tmp_path / "checkpoints" / "5"
        assert (step_dir / "data" / "process_0-of-1.json").exists()
        assert (step_dir / "commit_success.txt").exists()

    fresh = Checkpointer(tmp_path / "checkpoints")
    it2 = _iterator()
    abstract = jax.eval_shape(lambda: _make_state(0))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_ONE), abstract)
    restored, meta = fresh.restore(None, abstract, it2)
    fresh.close()
    _assert_tree_equal(restored, state)
    assert type(restored.opt_state) is type(state.opt_state)
    assert meta == {"config": {"lr": 1e-3, "name": "x"}, "tokens": 123, "step": 5}
    assert [next(it2) for _ in range(10)] == expected_next
    full = _iterator()
    assert [next(full) for _ in range(17)] == consumed + expected_next


def test_keep_last_k_schedule_and_force(tmp_path):
    with Checkpointer(tmp_path, CheckpointConfig(save_steps=2, save_total_limit=2, async_save=True)) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.maybe_save(s, {"x": jnp.asarray(s)})]
        assert saved == [2, 4, 6]
        assert ckpt.maybe_save(7, {"x": jnp.asarray(7)}, force=True)
        assert not ckpt.maybe_save(7, {"x": jnp.asarray(7)}, force=True)  # already there: end-of-run no-op
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]
    with Checkpointer(tmp_path, CheckpointConfig(save_steps=0)) as ckpt:
        assert ckpt.latest_step() == 7
        assert not any(ckpt.maybe_save(s, {"x": jnp.asarray(s)}) for s in range(8, 20))  # 0 = only at the end
        x, meta = ckpt.restore(6, {"x": jax.ShapeDtypeStruct((), jnp.int32, sharding=_ONE)})
        assert int(x["x"]) == 6 and meta["step"] == 6
        with pytest.raises(UserError, match="step 5 not found"):
            ckpt.restore(5, {"x": jax.ShapeDtypeStruct((), jnp.int32, sharding=_ONE)})


def test_restore_onto_sharded_target(tmp_path):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
    b = jnp.arange(12, dtype=jnp.float32)
    saved = {"w": jax.device_put(w, NamedSharding(mesh, P("data", "fsdp"))), "b": b}  # b on one device
    with Checkpointer(tmp_path, CheckpointConfig(save_steps=1)) as ckpt:
        ckpt.maybe_save(1, saved)
    want = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P("data"))}
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=want[k]) for k, v in saved.items()}
    with Checkpointer(tmp_path) as ckpt:
        restored, _ = ckpt.restore(1, target)
    for k in saved:
        assert restored[k].sharding == want[k]
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(saved[k]))
    assert {s.data.shape for s in restored["w"].addressable_shards} == {(2, 16)}


_KILL_CHILD = """
import sys
import numpy as np, jax.numpy as jnp
from openr1_jax.train.checkpointing import CheckpointConfig, Checkpointer
ckpt = Checkpointer(sys.argv[1], CheckpointConfig(save_steps=1, save_total_limit=3, async_save=True))
for step in range(1, 10_000):  # back-to-back async saves of ~64 MB of incompressible data
    rng = np.random.default_rng(step)
    ckpt.maybe_save(step, {"w": jnp.asarray(rng.standard_normal((16, 1024, 1024), np.float32)), "step": step})
"""


def test_kill_9_mid_save_leaves_previous_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD)
    ckdir = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(script), str(ckdir)], env=_run_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        tmp_step = None
        while tmp_step is None and time.time() < deadline and proc.poll() is None:
            if ckdir.exists():
                names = os.listdir(ckdir)
                tmps = [n for n in names if TMP_SUFFIX in n]
                if tmps and any(n.isdigit() for n in names):  # mid-save, with an earlier checkpoint committed
                    proc.send_signal(signal.SIGKILL)
                    tmp_step = int(re.match(r"(\d+)", tmps[0]).group(1))
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert tmp_step is not None, "never saw a save in progress"
    left = os.listdir(ckdir)
    complete = sorted(int(n) for n in left if n.isdigit())
    assert any(TMP_SUFFIX in n for n in left)  # the kill really interrupted a save
    assert complete and complete[-1] < tmp_step and len(complete) <= 3

    ckpt = Checkpointer(ckdir)
    assert ckpt.latest_step() == complete[-1]
    target = {"w": jax.ShapeDtypeStruct((16, 1024, 1024), jnp.float32, sharding=_ONE), "step": 0}
    restored, meta = ckpt.restore(None, target)
    step = complete[-1]
    assert meta["step"] == step and restored["step"] == step
    want = np.random.default_rng(step).standard_normal((16, 1024, 1024), np.float32)
    np.testing.assert_array_equal(np.asarray(restored["w"]), want)
    # Saving continues after the crash, including the step that was interrupted.
    assert ckpt.maybe_save(tmp_step, {"w": restored["w"], "step": tmp_step}, force=True)
    ckpt.close()
    assert ckpt.all_steps()[-1] == tmp_step
    # orbax removes leftovers in a background thread started on open and awaited before the first save.
    assert not any(TMP_SUFFIX in n for n in os.listdir(ckdir))


_SIGTERM_CHILD = """
import sys, signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when pytest ignores SIGINT
from pathlib import Path
import jax.numpy as jnp, grain
from openr1_jax.train.checkpointing import CheckpointConfig, Checkpointer, PreemptionGuard
out = Path(sys.argv[1])
ckpt = Checkpointer(out / "checkpoints", CheckpointConfig(save_steps=1000))
it = iter(grain.MapDataset.range(10_000).to_iter_dataset())
x = jnp.zeros(())
with PreemptionGuard() as guard:
    for step in range(1, 100_000):
        x = x + next(it)
        if step == 3:
            (out / "ready").write_text("")
        if guard.should_stop(step):
            ckpt.maybe_save(step, {"x": x}, it, meta={"reason": "preempted"}, force=True)
            break
        time.sleep(0.01)
ckpt.close()
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
print("stopped at", step)
"""


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_SIGTERM_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], env=_run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    step = int(re.search(rb"stopped at (\d+)", out).group(1))
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == step
        it = iter(grain.MapDataset.range(10_000).to_iter_dataset())
        restored, meta = ckpt.restore(step, {"x": jax.ShapeDtypeStruct((), jnp.int32, sharding=_ONE)}, it)
    assert meta == {"reason": "preempted", "step": step}
    assert int(restored["x"]) == sum(range(step))  # elements 0..step-1 were consumed
    assert next(it) == step


def test_guard_restores_previous_handlers():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with PreemptionGuard() as guard:
            assert guard.mode == "local" and not guard.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested and guard.should_stop(1)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


_TWO_PROCESS_CHILD = """
import os, sys, time
from pathlib import Path
pid, port, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import grain, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from openr1_jax.train.checkpointing import CheckpointConfig, Checkpointer, PreemptionGuard
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
full = np.arange(64, dtype=np.float32).reshape(8, 8)
it = iter(grain.MapDataset.range(1000).shuffle(seed=pid).to_iter_dataset())  # a different stream per process
ckpt = Checkpointer(out / "checkpoints", CheckpointConfig(save_steps=1000))
if mode == "train":
    sharding = NamedSharding(mesh, P("fsdp", None))
    w = jax.make_array_from_callback(full.shape, sharding, lambda idx: full[idx])
    with PreemptionGuard() as guard:
        assert guard.mode == "jax_sync"
        for step in range(1, 100_000):
            next(it)
            if step == 3:
                (out / f"ready{pid}").write_text("")
            if guard.should_stop(step):  # jax's sync manager: the same step on both processes
                ckpt.maybe_save(step, {"w": w * step}, it, meta={"stopped": step}, force=True)
                break
            time.sleep(0.01)
    print("stopped at", step, "next", next(it), flush=True)
else:
    sharding = NamedSharding(mesh, P(None, "fsdp"))
    target = {"w": jax.ShapeDtypeStruct(full.shape, np.float32, sharding=sharding)}
    state, meta = ckpt.restore(None, target, it)
    step = meta["stopped"]
    assert state["w"].sharding == sharding
    for shard in state["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index] * step)
    print("restored", step, "next", next(it), flush=True)
ckpt.close()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(script: Path, mode: str, out: Path) -> list[subprocess.Popen]:
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), port, mode, str(out)],
            env=_run_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for pid in (0, 1)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
        outs.append(out.decode())
    return outs


def test_two_processes_preemption_save_and_sharded_restore(tmp_path):
    """SIGTERM to one host: both stop at the same step, save per-process data state, restore resharded."""
    script = tmp_path / "child.py"
    script.write_text(_TWO_PROCESS_CHILD)
    procs = _launch_pair(script, "train", tmp_path)
    deadline = time.time() + 90
    while not all((tmp_path / f"ready{i}").exists() for i in (0, 1)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1].decode()[-3000:]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    trained = [re.search(r"stopped at (\d+) next (\d+)", o).groups() for o in _finish(procs)]
    assert trained[0][0] == trained[1][0]  # the same stop step on both hosts
    files = sorted(p.name for p in (tmp_path / "checkpoints" / trained[0][0] / "data").iterdir())
    assert files == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    restored = [
        re.search(r"restored (\d+) next (\d+)", o).groups() for o in _finish(_launch_pair(script, "restore", tmp_path))
    ]
    assert restored == trained  # each process resumes its own stream where it stopped
