"""A child process for the SFT resume and multi-host tests: runs `run_sft` with dotted overrides.

  python -m tests.train.sft_child [--process-id I --num-processes N --port P] [--kill-after-save S]
                                  [--stop-at S] [--shards N] KEY=VALUE ...

--kill-after-save S: SIGKILL this process right after the checkpoint of step S is committed (a crash).
--stop-at S: behave as if SIGTERM (preemption) arrived during step S (save and exit cleanly).
--late S: reach the job's first collective S seconds after the other processes (a slow host).
--shards N: one process feeding the global batches that N hosts would load (their per-host rows concatenated
            in process order), the single-process reference of the multi-host tests.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kill-after-save", type=int, default=None)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--late", type=float, default=None)
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import jax

    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        os.environ.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
            JAX_NUM_PROCESSES=str(args.num_processes),
            JAX_PROCESS_ID=str(args.process_id),
        )

    from openr1_jax.train import checkpointing, sft
    from openr1_jax.train.config import load_sft_config
    from tests.multihost.launch import arrive_late, crash_after_save

    if args.kill_after_save is not None:
        crash_after_save(args.kill_after_save)
    if args.late is not None:
        arrive_late(args.late)
    if args.stop_at is not None:
        checkpointing.PreemptionGuard.should_stop = lambda self, step: step >= args.stop_at

    cfg = load_sft_config("default", args.overrides)
    data = sharded_iterator(cfg, args.shards) if args.shards else None
    result = sft.run_sft(cfg, data)
    print(f"RESULT steps={result.steps} preempted={result.preempted}", flush=True)


def sharded_iterator(cfg, count: int):
    import grain
    import numpy as np

    from openr1_jax.data.chat import load_tokenizer
    from openr1_jax.data.pipeline import sft_iterator

    tokenizer = load_tokenizer(cfg.data)
    shards = [
        sft_iterator(cfg.data, tokenizer, cfg.batch_size // count, seed=cfg.seed, process_index=p, process_count=count)
        for p in range(count)
    ]

    class Shards(grain.DatasetIterator):
        def __init__(self):
            super().__init__()

        stats = property(lambda self: shards[0].stats)

        def __next__(self):
            batches = [next(s) for s in shards]
            return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

        def get_state(self):
            return {"shards": [s.get_state() for s in shards]}

        def set_state(self, state):
            for s, st in zip(shards, state["shards"]):
                s.set_state(st)

    return Shards()


if __name__ == "__main__":
    sys.exit(main())
