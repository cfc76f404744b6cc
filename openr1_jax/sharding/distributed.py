"""Multi-host start-up, host-local -> global batches, and global arrays -> every host.

On a TPU VM pod slice every host runs the same program; `jax.distributed.initialize()` finds the coordinator
and this host's id from the TPU metadata by itself. Elsewhere (GPU clusters, CPU tests) the coordinator
address, process count and process id come from arguments or from the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Must run before any other JAX call.
A process that stops sending heartbeats for OPENR1_JAX_HEARTBEAT_TIMEOUT seconds (default 30) ends the job on
every host; `watchdog.peer_watch` turns that end into one sentence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from openr1_jax.errors import UserError
from openr1_jax.sharding.rules import named_sharding
from openr1_jax.sharding.watchdog import heartbeat_timeout

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Join the multi-process job if there is one; returns True iff `jax.distributed.initialize` ran.

    Explicit arguments win over the environment; with neither, a TPU VM host of a multi-host slice
    (TPU_WORKER_HOSTNAMES lists more than one host, or MEGASCALE_* is set) lets JAX auto-detect; anything
    else is one process and nothing happens.
    """
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID")

    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise UserError(
                "multi-process start-up needs all of coordinator address, number of processes and process id "
                f"(arguments or {', '.join(_ENV)})"
            )
        if num_processes == 1:
            return False
        if not 0 <= process_id < num_processes:
            raise UserError(f"process id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout(env)
        )
    elif _multi_host_tpu(env):
        # Coordinator and ids from the TPU metadata server.
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout(env))
    else:
        return False
    _join_collectives()
    return True


def _join_collectives() -> None:
    """Build the collective group of all processes now, while they have all just left `initialize`'s start-up
    barrier. Built at the job's first collective instead, the processes can arrive far apart (one still compiling
    what another read from the compile cache), and gloo's rendezvous (CPU jobs) gives up after 30 s; once built,
    the group is reused and a collective waits for a late process as long as it takes."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("openr1-jax: every process has joined")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _multi_host_tpu(env: Mapping[str, str]) -> bool:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env


def host_local_batch_to_global(
    batch: Mapping[str, np.ndarray], mesh: Mesh, batch_sharding: NamedSharding | None = None
) -> dict[str, jax.Array]:
    """Each process passes its own rows ([B / processes, T] arrays, rows in process order); returns global
    [B, T] jax.Arrays sharded by `batch_sharding` (default: rows over the rules' batch axes)."""
    if batch_sharding is None:
        first = next(iter(batch.values()))
        global_rows = first.shape[0] * jax.process_count()
        batch_sharding = named_sharding(("batch", None), mesh, shape=(global_rows, *first.shape[1:]))
    out = {}
    for name, local in batch.items():
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(batch_sharding, np.asarray(local), global_shape)
    return out


def fetch(tree):
    """Every jax.Array in `tree` as a whole numpy array, on every process. Arrays whose rows are spread over the
    devices of several processes (np.asarray refuses those) are all-gathered first."""
    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(whole, tree)
