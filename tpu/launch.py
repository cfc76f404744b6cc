#!/usr/bin/env python3
"""Create, set up, run on, follow and tear down Cloud TPU VMs (gcloud) and GKE workloads (xpk).

Every subcommand first builds the exact commands it would run; `--dry-run` prints them, one per line and
shell-quoted, and runs nothing. Standard library only, so it runs on a laptop without the project installed:

    python3 tpu/launch.py create my-tpu --zone us-west4-a --accelerator-type v5litepod-8 --spot
    python3 tpu/launch.py setup  my-tpu --zone us-west4-a --repo URL --revision SHA
    python3 tpu/launch.py run    my-tpu --zone us-west4-a --logs logs/grpo -- openr1-jax grpo RECIPE
    python3 tpu/launch.py logs   logs/grpo
    python3 tpu/launch.py stop   my-tpu --zone us-west4-a
    python3 tpu/launch.py delete my-tpu --zone us-west4-a
    python3 tpu/launch.py xpk create --cluster C --workload W --tpu-type v5p-512 --docker-image IMG -- CMD

Bad arguments give one line on stderr naming the option and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


# accelerator-type prefix -> (generation, default --version, what the number after the dash counts).
# Runtimes are the TPU software versions Google recommends for JAX on each generation.
GENERATIONS = {
    "v4": ("v4", "tpu-ubuntu2204-base", "TensorCores"),
    "v5litepod": ("v5e", "v2-alpha-tpuv5-lite", "chips"),
    "v5p": ("v5p", "v2-alpha-tpuv5", "TensorCores"),
    "v6e": ("v6e", "v2-alpha-tpuv6e", "chips"),
}
_CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e and v6e slice sizes (1x1 ... 16x16)
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # GCE resource names and xpk workload names
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_accelerator(value: str, option: str = "--accelerator-type") -> tuple[str, int]:
    """'v5p-512' -> ('v5p', 512), or a UsageError naming `option`."""
    prefix, _, size = value.rpartition("-")
    if not prefix or not size.isdigit():
        raise UsageError(f"{option} {value!r}: expected GENERATION-SIZE such as v5litepod-8, v5p-512 or v6e-256")
    if prefix == "v5e":
        raise UsageError(f"{option} {value!r}: TPU v5e slices are named v5litepod-{size}")
    if prefix not in GENERATIONS:
        raise UsageError(f"{option} {value!r}: unknown TPU generation {prefix!r} (known: {', '.join(GENERATIONS)})")
    n = int(size)
    generation, _, unit = GENERATIONS[prefix]
    if unit == "chips" and n not in _CHIP_SIZES:
        raise UsageError(f"{option} {value!r}: {generation} slices have {', '.join(map(str, _CHIP_SIZES))} chips")
    if unit == "TensorCores" and (n < 8 or n % 8):
        raise UsageError(f"{option} {value!r}: {generation} sizes count TensorCores, a multiple of 8 ({prefix}-8, ...)")
    return prefix, n


def num_hosts(accelerator_type: str) -> int:
    """TPU VM workers of a slice: 4 chips per VM, except single-host v5e/v6e slices of up to 8 chips."""
    prefix, n = parse_accelerator(accelerator_type)
    if GENERATIONS[prefix][2] == "chips":
        return 1 if n <= 8 else n // 4
    return max(1, n // 2 // 4)  # two TensorCores per chip


def _check_name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value) or len(value) > 63:
        raise UsageError(f"{what} {value!r} must be lowercase letters, digits and hyphens, starting with a letter")
    return value


def _env_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not _ENV_KEY.fullmatch(key):
            raise UsageError(f"--env {pair!r}: expected KEY=VALUE with KEY a shell variable name")
        out.append((key, value))
    return out


def _q(word: str) -> str:
    """shlex.quote, but double quotes where they are as safe: the remote script travels inside single quotes,
    where each single quote of its own would print as '"'"' in the dry run."""
    quoted = shlex.quote(word)
    if quoted == word or re.search(r'["$`\\!]', word):
        return quoted
    return f'"{word}"'


def _user_command(words: list[str], sub: str) -> str:
    """One word is a shell snippet used as is ('cd x && y'); several words are quoted one by one."""
    if not words:
        raise UsageError(f"{sub} needs a command after `--`, e.g. `-- openr1-jax grpo openr1-math-qwen2.5-1.5b`")
    return words[0] if len(words) == 1 else shlex.join(words)


# ---------------------------------------------------------------------------------------------------------
# Command builders: args -> list of argv lists. Pure, so tests compare them exactly.
# ---------------------------------------------------------------------------------------------------------
def _gcloud(args, words: list[str], flags: tuple[str, ...] | list[str] = ()) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *words, "--zone", args.zone, *flags]
    return cmd + (["--project", args.project] if args.project else [])


def _ssh(args, worker: str, remote: str) -> list[str]:
    return _gcloud(args, ["tpu-vm", "ssh", args.name], [f"--worker={worker}", "--command", remote])


def build_create(args) -> list[list[str]]:
    _check_name(args.name, "NAME")
    prefix, _ = parse_accelerator(args.accelerator_type)
    version = args.version or GENERATIONS[prefix][1]
    capacity = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if not args.queued:
        if args.valid_until_duration:
            raise UsageError("--valid-until-duration applies only to a queued resource (add --queued)")
        flags = ["--accelerator-type", args.accelerator_type, "--version", version, *capacity]
        return [_gcloud(args, ["tpu-vm", "create", args.name], flags)]
    qr = _check_name(args.queued_resource or args.name, "--queued-resource")
    flags = ["--node-id", args.name, "--accelerator-type", args.accelerator_type, "--runtime-version", version]
    flags += capacity
    if args.valid_until_duration:
        flags += ["--valid-until-duration", args.valid_until_duration]
    return [_gcloud(args, ["queued-resources", "create", qr], flags)]


def build_setup(args) -> list[list[str]]:
    _check_name(args.name, "NAME")
    q, py, rev = _q, _q(args.python), args.revision  # q: the remote shell's quoting
    script = [
        f"{{ [ -d {q(args.dir)}/.git ] || git clone --quiet {q(args.repo)} {q(args.dir)}; }}",
        f"cd {q(args.dir)}",
        f"git remote set-url origin {q(args.repo)}",
        "git fetch --quiet --tags origin",
        # A branch name must mean the freshly fetched origin/BRANCH, not a stale local branch; SHAs and tags
        # resolve directly.
        f'git checkout --quiet --detach "$(git rev-parse --verify --quiet {q(f"origin/{rev}^{{commit}}")}'
        f' || git rev-parse --verify {q(f"{rev}^{{commit}}")})"',
        # TPU VM images ship Ubuntu 22.04's python3.10; openr1-jax needs >= 3.11. The lock timeout waits out
        # the unattended upgrades that hold the dpkg lock on a freshly booted VM.
        f"{{ command -v {py} >/dev/null || {{ sudo apt-get -qq update && sudo apt-get -qq -y"
        f" -o DPkg::Lock::Timeout=600 install {py} {q(args.python + '-venv')}; }}; }}",
        f"{{ [ -x .venv/bin/python ] || {py} -m venv .venv; }}",
        ".venv/bin/python -m pip install --quiet --upgrade pip",
        f".venv/bin/python -m pip install --quiet -e {q(f'.[{args.extra}]')}",
        'echo "$(hostname): openr1-jax $(git rev-parse HEAD), $(.venv/bin/python --version)"',
    ]
    return [_ssh(args, "all", " && ".join(script))]


def run_workers(args) -> list[str]:
    """The --worker values of `run`: 'all' in one ssh, or one ssh per worker when logs are kept apart."""
    if args.worker != "all" and not args.worker.isdigit():
        raise UsageError(f"--worker {args.worker!r}: expected 'all' or a worker number")
    if not args.logs or args.worker != "all":
        return [args.worker]
    if args.workers:
        return [str(i) for i in range(args.workers)]
    if args.accelerator_type:
        return [str(i) for i in range(num_hosts(args.accelerator_type))]
    raise UsageError("--logs needs the number of workers: add --accelerator-type (e.g. v5p-64) or --workers N")


def build_run(args) -> list[list[str]]:
    _check_name(args.name, "NAME")
    command = _user_command(args.command, "run")
    env = _env_pairs(args.env)
    remote = [f"cd {_q(args.dir)}"]
    if env:  # before worker_env.sh, so JAX_COORDINATOR_PORT and friends can be overridden
        remote.append("export " + " ".join(f"{k}={_q(v)}" for k, v in env))
    # worker_env.sh (from the checkout `setup` made) puts .venv/bin first on PATH and sets the
    # jax.distributed variables from the TPU metadata server; see its header.
    remote += [". tpu/worker_env.sh", command]
    return [_ssh(args, w, " && ".join(remote)) for w in run_workers(args)]


def log_files(log_dir: str) -> list[Path]:
    files = [p for p in Path(log_dir).glob("worker-*.log") if p.stem[7:].isdigit()]
    return sorted(files, key=lambda p: int(p.stem[7:]))


def build_logs(args) -> list[list[str]]:
    files = log_files(args.dir)
    if not files:
        raise UsageError(f"{args.dir!r} holds no worker-N.log files (`run --logs {args.dir}` writes them)")
    return [["tail", "-n", str(args.lines), *(["-F"] if args.follow else []), *map(str, files)]]


def build_stop(args) -> list[list[str]]:
    _check_name(args.name, "NAME")
    if args.vm:
        return [_gcloud(args, ["tpu-vm", "stop", args.name])]
    remote = f'pkill -{args.signal} -f {_q(args.pattern)} || echo "$(hostname): no process to stop"'
    return [_ssh(args, "all", remote)]


def build_delete(args) -> list[list[str]]:
    _check_name(args.name, "NAME")
    quiet = ["--quiet"] if args.yes else []
    if args.queued:  # --force also deletes the TPU VM the queued resource made
        qr = _check_name(args.queued_resource or args.name, "--queued-resource")
        return [_gcloud(args, ["queued-resources", "delete", qr], ["--force", *quiet])]
    return [_gcloud(args, ["tpu-vm", "delete", args.name], quiet)]


def build_status(args) -> list[list[str]]:
    _check_name(args.name, "NAME")
    if args.queued:
        return [_gcloud(args, ["queued-resources", "describe", args.queued_resource or args.name])]
    return [_gcloud(args, ["tpu-vm", "describe", args.name])]


def build_xpk(args) -> list[list[str]]:
    _check_name(args.workload, "--workload")
    if len(args.workload) > 40:
        raise UsageError(f"--workload {args.workload!r} is longer than xpk's 40 characters")
    cmd = ["xpk", "workload", args.action, "--cluster", args.cluster, "--workload", args.workload]
    if args.action == "create":
        if not args.tpu_type:
            raise UsageError("xpk create needs --tpu-type, e.g. v5p-512")
        parse_accelerator(args.tpu_type, "--tpu-type")
        if not args.docker_image:
            raise UsageError("xpk create needs --docker-image (build it with tpu/Dockerfile)")
        cmd += ["--tpu-type", args.tpu_type, "--num-slices", str(args.num_slices)]
        cmd += ["--docker-image", args.docker_image, "--command", _user_command(args.command, "xpk create")]
        cmd += [word for k, v in _env_pairs(args.env) for word in ("--env", f"{k}={v}")]
        if args.max_restarts is not None:
            cmd += ["--max-restarts", str(args.max_restarts)]
    elif args.command or args.env:
        raise UsageError("xpk delete takes no command and no --env")
    cmd += ["--zone", args.zone] if args.zone else []
    return [cmd + (["--project", args.project] if args.project else [])]


# ---------------------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block; the message names the option
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="TPU VM name (lowercase letters, digits, hyphens)")
    p.add_argument("--zone", required=True, help="zone of the TPU, e.g. us-west4-a (v5e) or us-east5-a (v5p)")
    p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run nothing")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launch.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("create", help="create a TPU VM or a queued resource")
    _common(p)
    p.add_argument("--accelerator-type", required=True, help="v5litepod-8, v5p-64, v6e-256, ...")
    p.add_argument(
        "--version",
        help="TPU runtime (default per generation: " + ", ".join(f"{g}: {r}" for g, r, _ in GENERATIONS.values()) + ")",
    )
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (cheaper, preemptible)")
    capacity.add_argument("--reserved", action="store_true", help="your reservation's capacity")
    p.add_argument("--queued", action="store_true", help="request a queued resource (waits for capacity)")
    p.add_argument("--queued-resource", metavar="QR", help="queued resource id (default: NAME)")
    p.add_argument("--valid-until-duration", metavar="D", help="with --queued: give up after D, e.g. 6h")

    p = sub.add_parser("setup", help="install the project at one git revision on every worker")
    _common(p)
    p.add_argument("--repo", required=True, help="git URL the workers clone")
    p.add_argument("--revision", required=True, help="commit SHA (best: every worker identical), tag or branch")
    p.add_argument("--python", default="python3.11", help="interpreter for the venv (default: %(default)s)")
    p.add_argument("--dir", default="openr1-jax", help="checkout folder on the workers (default: %(default)s)")
    p.add_argument("--extra", default="tpu", help="pip extra to install (default: %(default)s)")

    after = "COMMAND: one word is a shell snippet used as is ('cd x && y'); several words are quoted one by one"
    p = sub.add_parser(
        "run",
        help="run a command on every worker with the jax.distributed environment",
        usage="%(prog)s NAME --zone ZONE [options] -- COMMAND [ARGS...]",
        epilog=after,
    )
    _common(p)
    p.add_argument("--dir", default="openr1-jax", help="checkout folder on the workers (default: %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="export K=V first (repeatable)")
    p.add_argument(
        "--logs",
        metavar="DIR",
        help="one ssh per worker; stream with a [worker N] prefix and append each worker's output to DIR/worker-N.log",
    )
    p.add_argument("--accelerator-type", help="with --logs: the slice type, to count its workers")
    p.add_argument("--workers", type=int, metavar="N", help="with --logs: the number of workers")
    p.add_argument("--worker", default="all", help="'all' (default) or one worker number")

    p = sub.add_parser("logs", help="tail the logs that `run --logs DIR` collected")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-n", "--lines", type=int, default=20, help="lines per worker (default: %(default)s)")
    p.add_argument("-f", "--follow", action="store_true", help="keep following (tail -F)")
    p.add_argument("--dry-run", action="store_true", help="print the command and run nothing")

    p = sub.add_parser("stop", help="stop the job on every worker (SIGTERM: save, then exit) or stop the VM")
    _common(p)
    p.add_argument("--signal", default="TERM", choices=["TERM", "INT", "KILL"], help="default: %(default)s")
    # '[.]venv' matches the job's '.venv/bin/openr1-jax' but not the pkill command line that carries the pattern.
    p.add_argument("--pattern", default="[.]venv/bin/openr1-jax", help="pkill -f regex (default: %(default)s)")
    p.add_argument("--vm", action="store_true", help="stop the TPU VM itself instead (gcloud tpu-vm stop)")

    p = sub.add_parser("delete", help="delete the TPU VM or the queued resource")
    _common(p)
    p.add_argument("--queued", action="store_true", help="delete the queued resource and its TPU VM")
    p.add_argument("--queued-resource", metavar="QR", help="queued resource id (default: NAME)")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation (gcloud --quiet)")

    p = sub.add_parser("status", help="describe the TPU VM or the queued resource")
    _common(p)
    p.add_argument("--queued", action="store_true", help="describe the queued resource")
    p.add_argument("--queued-resource", metavar="QR", help="queued resource id (default: NAME)")

    p = sub.add_parser(
        "xpk",
        help="create or delete a GKE workload with xpk",
        usage="%(prog)s {create,delete} --cluster C --workload W [options] [-- COMMAND [ARGS...]]",
        epilog=after,
    )
    p.add_argument("action", choices=["create", "delete"])
    p.add_argument("--cluster", required=True)
    p.add_argument("--workload", required=True, help="workload name (at most 40 characters)")
    p.add_argument("--tpu-type", help="create: slice type per slice, e.g. v5p-512")
    p.add_argument("--num-slices", type=int, default=1, help="create: slices, over DCN (default: %(default)s)")
    p.add_argument("--docker-image", help="create: the image to run (see tpu/Dockerfile)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="create: container variable")
    p.add_argument("--max-restarts", type=int, help="create: JobSet restarts after a failure or preemption")
    p.add_argument("--zone", help="the cluster's zone")
    p.add_argument("--project")
    p.add_argument("--dry-run", action="store_true", help="print the command and run nothing")
    return parser


BUILDERS = {
    "create": build_create,
    "setup": build_setup,
    "run": build_run,
    "logs": build_logs,
    "stop": build_stop,
    "delete": build_delete,
    "status": build_status,
    "xpk": build_xpk,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options before `--`, the command to run after it (argparse's REMAINDER would also swallow options
    that follow a positional NAME)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = make_parser()
    args = parser.parse_args(argv[:cut])
    args.command = argv[cut + 1 :]
    if args.command and args.sub not in ("run", "xpk"):
        parser.error(f"{args.sub} takes no command after --")
    return args


def commands(argv: list[str]) -> list[list[str]]:
    """The commands `launch.py ARGV` would run (parsing errors exit 2; bad values raise UsageError)."""
    args = parse_args(argv)
    return BUILDERS[args.sub](args)


# ---------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------
def _run_one_by_one(cmds: list[list[str]]) -> int:
    for cmd in cmds:
        rc = subprocess.run(cmd).returncode
        if rc:
            return rc
    return 0


def _run_logged(cmds: list[list[str]], workers: list[str], log_dir: Path) -> int:
    """One process per worker, in parallel; lines go to our stdout with a prefix and to DIR/worker-N.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    width = max(map(len, workers))
    started = datetime.datetime.now().isoformat(timespec="seconds")

    def pump(worker: str, proc: subprocess.Popen) -> None:
        prefix = f"[worker {worker:>{width}}] ".encode()
        # Append: a rerun after a preemption keeps the earlier run's log above its own.
        with open(log_dir / f"worker-{worker}.log", "ab") as log:
            log.write(f"=== launch.py run {started} ===\n".encode())
            for line in proc.stdout:
                log.write(line)
                log.flush()
                with lock:
                    sys.stdout.buffer.write(prefix + line)
                    sys.stdout.buffer.flush()

    # stdin from /dev/null: parallel ssh sessions must not compete for the terminal.
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for cmd in cmds
    ]
    threads = [threading.Thread(target=pump, args=(w, p), daemon=True) for w, p in zip(workers, procs)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        print("launch.py run: interrupted; the job may still run on the workers (stop it with `stop`)", file=sys.stderr)
        return 130
    failed = [(w, rc) for w, rc in zip(workers, codes) if rc]
    for w, rc in failed:
        print(f"launch.py run: worker {w} exited with status {rc}", file=sys.stderr)
    return failed[0][1] if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cmds = BUILDERS[args.sub](args)
    except UsageError as e:
        print(f"launch.py {args.sub}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in cmds))
        return 0
    try:
        if args.sub == "run" and args.logs:
            return _run_logged(cmds, run_workers(args), Path(args.logs))
        return _run_one_by_one(cmds)
    except FileNotFoundError as e:
        print(
            f"launch.py {args.sub}: {e.filename} not found on PATH (install the Google Cloud CLI / xpk)",
            file=sys.stderr,
        )
        return 127
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
