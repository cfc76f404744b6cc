"""A child process for the multi-host GRPO tests: runs `run_grpo` with dotted overrides and the `digits` reward.

  python -m tests.rl.grpo_child [--process-id I --num-processes N --port P] [--kill-after-save S] KEY=VALUE ...

With --process-id it joins an N-process job (jax.distributed on 127.0.0.1, gloo CPU collectives). The launcher
sets JAX_PLATFORMS, XLA_FLAGS (devices per process) and the compile cache; see tests/multihost/launch.py.
--kill-after-save S: SIGKILL this process right after the checkpoint of step S is committed (a crash).
"""

from __future__ import annotations

import argparse
import os
import sys


def digit_reward(completions, **_):
    """Learnable from a random model: the share of digits in the completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kill-after-save", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        os.environ.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
            JAX_NUM_PROCESSES=str(args.num_processes),
            JAX_PROCESS_ID=str(args.process_id),
        )

    from openr1_jax.rl.config import load_grpo_config
    from openr1_jax.rl.grpo import run_grpo
    from tests.multihost.launch import crash_after_save

    if args.kill_after_save is not None:
        crash_after_save(args.kill_after_save)

    result = run_grpo(load_grpo_config("default", args.overrides), extra_rewards={"digits": digit_reward})
    print(f"RESULT steps={result.steps} preempted={result.preempted}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
