"""One process of the lost-process tests (tests/multihost/test_watchdog.py): joins an N-process job and, inside
`peer_watch`, all-reduces a tiny array every 50 ms until it is killed; prints READY once the first one is done.

  python -m tests.multihost.collective_worker --process-id I --num-processes N --port P CHECKPOINTS [--fail]

--fail: raise an error of its own after READY (not a lost peer).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("checkpoints", type=Path)
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from openr1_jax.sharding.distributed import initialize_distributed
    from openr1_jax.sharding.watchdog import peer_watch

    initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x = jax.make_array_from_callback(
        (jax.device_count(),), NamedSharding(mesh, PartitionSpec("d")), lambda i: np.ones(1, np.float32)
    )
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
    with peer_watch(args.checkpoints):
        assert float(total(x)) == jax.device_count()
        print("READY", flush=True)
        if args.fail:
            raise RuntimeError("an error of this process's own")
        while True:
            float(total(x))
            time.sleep(0.05)


if __name__ == "__main__":
    main()
