"""Run untrusted, model-written programs: one sandbox each, no network, a private /tmp, limits, a wall clock.

How a run is isolated (`isolation="namespaces"`, the default wherever it works):
- A small supervisor (`_INIT`, plain Python) unshares new mount, PID, network, IPC and UTS namespaces, plus a user
  namespace when not root, and forks pid 1 of the new PID namespace. When pid 1 dies the kernel kills everything
  left in the namespace, so a program cannot leave a process behind (a fork bomb, a daemon, a `setsid` child).
- Network: the new network namespace holds only a loopback interface that is down: nothing can be reached, not
  even the host's 127.0.0.1 or its abstract Unix sockets.
- Files: root's and users' homes, `/run` (user buses, sockets) and the host `/tmp` are covered by empty tmpfs
  mounts (the interpreter's own directories are bound back), `/dev` holds only null/zero/full/random/urandom
  (no GPU or TPU devices), then every mount is made read-only at once (`mount_setattr`, Linux >= 5.12); only a
  fresh size-limited tmpfs on `/tmp` (cwd and HOME, gone with the namespace) and `/dev/shm` are writable. As root,
  rlimits do not stop writes and `RLIMIT_NPROC` does not bind, so the program also drops to an unprivileged uid
  of its own (`_UID_BASE` + n, a fresh one per run, so process counts never add up across runs); without root it
  keeps the caller's uid, mapped into its user namespace, where (Linux >= 5.14) process counts are per namespace.
- Limits (`setrlimit`): CPU seconds, address space, file size, processes, open files, no core files;
  `no_new_privs` (setuid binaries gain nothing); `oom_score_adj` 1000 so the OOM killer takes sandboxes first.
- The parent kills the whole namespace at the wall-clock timeout or when stdout/stderr pass `max_output_bytes`
  (read as they come, never buffered past the cap); the environment is empty but PATH, LANG, HOME, TMPDIR.

Fallbacks: `isolation="auto"` tries the namespaces above, then bubblewrap (`bwrap`, when on PATH and not root:
the same layout through its flags, for hosts that allow user namespaces only to bwrap, as Ubuntu 24.04 does; as
root bwrap maps only uid 0, so the program would stay root and unlimited). If neither works, the first run raises
`UserError` saying how to get one. `isolation="none"` runs programs with
the limits, timeout, clean environment and a temporary directory but WITHOUT namespaces: a program can then use
the network and write anywhere the caller can. Only for code you trust.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from openr1_jax.errors import UserError

ISOLATIONS = ("auto", "namespaces", "bwrap", "none")
_UID_BASE = 2_000_000_000  # sandbox uids when running as root: no passwd entry needed, far from real users
_UID_SLOTS = 1_000_000
_uids = itertools.count(random.randrange(_UID_SLOTS))  # a random start: two trainers on one host rarely meet
_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
_HIDDEN = ("/root", "/home", "/run")  # plus the caller's home; covered by empty tmpfs mounts in the sandbox


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one run (each program gets its own). Bad values raise `UserError`."""

    timeout_s: float = 10.0  # wall clock for the whole run; past it the sandbox is killed
    cpu_s: float = 10.0  # CPU seconds per process (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 512  # address space per process: an allocation past it fails (MemoryError)
    file_size_mb: int = 16  # largest file a program may write (SIGXFSZ)
    tmp_size_mb: int = 64  # all files in the private /tmp together (isolated runs)
    max_processes: int = 64  # processes and threads of the sandbox's user
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20  # per stream; a program printing more is killed and its output truncated
    isolation: str = "auto"  # "auto" | "namespaces" | "bwrap" | "none" (UNSAFE, see the module docstring)
    python: str | None = None  # the interpreter that runs programs (`-I`); default: this one

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_size_mb", "tmp_size_mb"):
            if not getattr(self, name) > 0:
                raise UserError(f"sandbox {name} must be > 0, not {getattr(self, name)}")
        for name in ("max_processes", "max_open_files", "max_output_bytes"):
            if not getattr(self, name) >= 1:
                raise UserError(f"sandbox {name} must be >= 1, not {getattr(self, name)}")
        if self.isolation not in ISOLATIONS:
            raise UserError(f"sandbox isolation must be one of {', '.join(ISOLATIONS)}, not '{self.isolation}'")


@dataclass(frozen=True)
class RunResult:
    stdout: str
    stderr: str
    exit_code: int | None  # the program's status, -N when signal N ended it; None if it never finished
    timed_out: bool = False
    killed_reason: str | None = None  # timeout | output_limit | cpu_limit | file_size_limit | killed | sandbox_error
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None


def run_program(source: str, stdin: str = "", cfg: SandboxConfig | None = None) -> RunResult:
    """Run one Python program in a fresh sandbox with `stdin` as its standard input."""
    cfg = cfg or SandboxConfig()
    return _run(source, stdin, cfg, _plan(cfg.isolation, cfg.python or sys.executable))


def run_many(
    jobs: Iterable[tuple[str, str]], cfg: SandboxConfig | None = None, num_parallel: int | None = None
) -> list[RunResult]:
    """Run `(source, stdin)` jobs, `num_parallel` sandboxes at a time (default: one per CPU); results in order."""
    cfg = cfg or SandboxConfig()
    jobs = list(jobs)
    plan = _plan(cfg.isolation, cfg.python or sys.executable)  # probe once, before any thread starts
    workers = max(1, min(num_parallel or os.cpu_count() or 1, len(jobs) or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda job: _run(job[0], job[1], cfg, plan), jobs))


# ----------------------------------------------------------------------------------------------------------
# choosing and probing an isolation
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    kind: str  # namespaces | bwrap | none
    python: str
    hide: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()


@functools.cache
def _plan(isolation: str, python: str) -> _Plan:
    """The first isolation that runs a trivial program here; `UserError` when none does."""
    # The real interpreter behind a venv's symlink: the venv (or the checkout holding it) may live under /tmp,
    # which the sandbox covers with its private tmpfs, and programs run with -I -S, so the venv adds nothing.
    python = os.path.realpath(python)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise UserError(f"the sandbox interpreter '{python}' is not an executable file")
    if sys.platform != "linux" and isolation != "none":
        raise UserError("the code sandbox needs Linux namespaces; on this OS only isolation='none' (unsafe) runs")
    hide, keep = _hidden_and_kept(python)
    failures = []
    for kind in ("namespaces", "bwrap") if isolation == "auto" else (isolation,):
        if kind == "bwrap" and shutil.which("bwrap") is None:
            failures.append("bwrap: not installed")
            continue
        if kind == "bwrap" and os.geteuid() == 0:  # it maps only uid 0: the program would stay root, unlimited
            failures.append("bwrap: not used as root (it keeps the program root; use isolation='namespaces')")
            continue
        plan = _Plan(kind, python, hide, keep)
        probe = _run("print('ok')", "", SandboxConfig(timeout_s=60), plan)
        if probe.ok and probe.stdout == "ok\n":
            return plan
        failures.append(f"{kind}: {(probe.stderr.strip() or probe.killed_reason or 'no output')[-300:]}")
    raise UserError(
        f"cannot isolate model-written programs here ({'; '.join(failures)}): run as root, allow unprivileged user"
        " namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04"
        " kernel.apparmor_restrict_unprivileged_userns=0), or install bubblewrap (apt-get install bubblewrap);"
        " isolation='none' runs them without isolation (unsafe: network and your files are reachable)"
    )


def _hidden_and_kept(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Directories to cover with empty tmpfs, and the interpreter's directories to bind back inside them."""
    home = os.path.expanduser("~")
    hide = sorted({os.path.realpath(d) for d in (*_HIDDEN, home) if d and os.path.isdir(d)} - {"/"})
    hide = [d for d in hide if not any(d.startswith(h + "/") for h in hide)]
    needed = {os.path.realpath(d) for d in _interpreter_dirs(python)} | {os.path.dirname(os.path.abspath(python))}
    hide = [h for h in hide if not any(n == h or h.startswith(n + "/") for n in needed)]
    keep = sorted(n for n in needed if any(n.startswith(h + "/") for h in hide))
    keep = [k for k in keep if not any(k.startswith(o + "/") for o in keep)]
    return tuple(hide), tuple(keep)


def _interpreter_dirs(python: str) -> list[str]:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return [sys.base_prefix, sys.base_exec_prefix]  # the venv's own prefix is not used (-I -S)
    code = "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
    try:
        out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, timeout=60, check=True)
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise UserError(f"the sandbox interpreter '{python}' does not run: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------
def _run(source: str, stdin: str, cfg: SandboxConfig, plan: _Plan) -> RunResult:
    start = time.monotonic()
    hostdir = None
    try:
        with tempfile.TemporaryFile() as src, tempfile.TemporaryFile() as inp:
            src.write(source.encode("utf-8", "surrogatepass"))
            src.flush()
            inp.write(stdin.encode("utf-8", "surrogatepass"))
            inp.flush()
            inp.seek(0)
            if plan.kind == "none":
                hostdir = tempfile.mkdtemp(prefix="openr1-sandbox-")
            status_r, status_w = os.pipe()
            spec = _spec(cfg, plan, src.fileno(), status_w, hostdir)
            # the supervisor is stdlib-only; the sandbox's interpreter is the one sure to be visible inside bwrap
            argv = [plan.python, "-I", "-S", "-c", _INIT, json.dumps(spec)]
            if plan.kind == "bwrap":
                argv = [*_bwrap_argv(cfg, plan), *argv]
            with os.fdopen(status_r, "rb") as status:
                try:
                    proc = subprocess.Popen(
                        argv,
                        stdin=inp,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        pass_fds=(src.fileno(), status_w),
                        start_new_session=True,  # one process group to kill
                        env={"PATH": _ENV_PATH, "LANG": "C.UTF-8"},
                    )
                finally:
                    os.close(status_w)  # ours must go, or the status pipe never ends
                return _watch(proc, status, cfg, start)
    except OSError as e:  # no fds, no processes left: this run cannot be scored, training goes on
        return RunResult("", f"sandbox: {e}", None, killed_reason="sandbox_error", duration_s=time.monotonic() - start)
    finally:
        if hostdir is not None:
            shutil.rmtree(hostdir, ignore_errors=True)


def _spec(cfg: SandboxConfig, plan: _Plan, source_fd: int, status_fd: int, hostdir: str | None) -> dict:
    mb = 1 << 20
    cpu = max(1, round(cfg.cpu_s))
    spec = {
        "python": plan.python,
        "source_fd": source_fd,
        "status_fd": status_fd,
        "namespaces": plan.kind == "namespaces",
        "workdir": hostdir or "/tmp",
        "alarm_s": cfg.timeout_s + 10,  # pid 1 ends the sandbox by itself should the parent vanish
        "parent": None if plan.kind == "bwrap" else os.getpid(),  # in bwrap our parent is outside its PID ns
        "env": {"PATH": _ENV_PATH, "LANG": "C.UTF-8", "HOME": hostdir or "/tmp", "TMPDIR": hostdir or "/tmp"},
        "rlimits": [
            (resource.RLIMIT_CPU, cpu, cpu + 1),
            (resource.RLIMIT_AS, cfg.memory_mb * mb, cfg.memory_mb * mb),
            (resource.RLIMIT_FSIZE, cfg.file_size_mb * mb, cfg.file_size_mb * mb),
            (resource.RLIMIT_NPROC, cfg.max_processes, cfg.max_processes),
            (resource.RLIMIT_NOFILE, cfg.max_open_files, cfg.max_open_files),
            (resource.RLIMIT_CORE, 0, 0),
        ],
        "setuid": None,
        "map_ids": None,
        "hide": list(plan.hide),
        "keep": list(plan.keep),
        "tmp_bytes": cfg.tmp_size_mb * mb,
    }
    if plan.kind == "namespaces" and os.geteuid() == 0:
        uid = _UID_BASE + next(_uids) % _UID_SLOTS
        spec["setuid"] = [uid, uid]
    elif plan.kind == "namespaces":
        spec["map_ids"] = [os.geteuid(), os.getegid()]
    return spec


@functools.lru_cache(maxsize=1)
def _bwrap_has_size() -> bool:
    out = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, check=False)
    return "--size" in out.stdout + out.stderr


def _bwrap_argv(cfg: SandboxConfig, plan: _Plan) -> list[str]:
    """bubblewrap flags for the layout `_INIT` builds itself in the namespaces mode."""
    size = ["--size", str(cfg.tmp_size_mb << 20)] if _bwrap_has_size() else []  # bwrap >= 0.10
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--as-pid-1", "--ro-bind", "/", "/"]
    argv += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/tmp", *size, "--tmpfs", "/dev/shm"]
    for hidden in plan.hide:
        argv += ["--tmpfs", hidden]
        argv += [arg for kept in plan.keep if kept.startswith(hidden + "/") for arg in ("--ro-bind", kept, kept)]
    return [*argv, "--chdir", "/tmp", "--"]


def _watch(proc: subprocess.Popen, status, cfg: SandboxConfig, start: float) -> RunResult:
    """Read output (capped) and status until the run ends or must be killed; then collect the result."""
    out, err, stat = bytearray(), bytearray(), bytearray()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status.fileno(): stat}
    reason = None
    deadline = start + cfg.timeout_s
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and reason is None:
            left = deadline - time.monotonic()
            if left <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
                if key.fd != status.fileno() and len(bufs[key.fd]) > cfg.max_output_bytes:
                    reason = "output_limit"
    if reason is not None and b"\n" not in stat:  # wait a moment for the "pid" line, to kill the sandbox cleanly
        with selectors.DefaultSelector() as sel:
            sel.register(status.fileno(), selectors.EVENT_READ)
            while b"\n" not in stat and sel.select(0.05) and (chunk := os.read(status.fileno(), 1 << 16)):
                stat += chunk
    lines = stat.decode(errors="replace").splitlines()
    if reason is not None:
        _kill(proc, lines)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _kill(proc, [])
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    stdout = out[: cfg.max_output_bytes].decode(errors="replace")
    stderr = err[: cfg.max_output_bytes].decode(errors="replace")
    duration = time.monotonic() - start
    errors = [line[6:] for line in lines if line.startswith("error ")]
    if errors:
        return RunResult(stdout, f"sandbox: {errors[0]}", None, killed_reason="sandbox_error", duration_s=duration)
    exits = [int(line[5:]) for line in lines if line.startswith("exit ")]
    if reason is not None or not exits:
        reason = reason or "sandbox_error"
        return RunResult(stdout, stderr, None, reason == "timeout", reason, duration)
    code = os.waitstatus_to_exitcode(exits[0])
    return RunResult(stdout, stderr, code, False, _SIGNAL_REASONS.get(code), duration)


_SIGNAL_REASONS = {  # a program ended by these signals hit a limit
    -signal.SIGXCPU: "cpu_limit",
    -signal.SIGXFSZ: "file_size_limit",
    -signal.SIGKILL: "killed",  # the CPU hard limit or the OOM killer
}


def _kill(proc: subprocess.Popen, status_lines: Sequence[str]) -> None:
    """Kill pid 1 of the sandbox first (the kernel then kills the rest), so the supervisor reaps it; then the group."""
    for line in status_lines:
        if line.startswith("pid "):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line[4:]), signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    if proc.poll() is None:  # not reaped yet, so its pid (the group id) cannot have been reused
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# The supervisor. Runs as `python -I -S -c _INIT SPEC` (stdlib only). It reports on the status pipe: "pid N" (pid 1
# of the sandbox, host view), "error MSG" (set-up failed; the program never ran) and "exit STATUS" (wait status).
_INIT = r"""
import ctypes, json, os, resource, signal, sys, time

spec = json.loads(sys.argv[1])
status_fd = spec["status_fd"]
os.set_inheritable(status_fd, False)  # the program never holds it: its exec closes it
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

def report(line):
    try:
        os.write(status_fd, (line + "\n").encode())
    except OSError:
        pass

def fail(what):
    report("error " + what)
    os._exit(125)

def check(ret, what):
    if ret != 0:
        fail(what + ": " + os.strerror(ctypes.get_errno()))

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), "mount " + target)

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

def die_with_parent(parent):
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:  # it died before the line above
        os._exit(125)

def build_filesystem():
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    for hidden in spec["hide"]:
        kept = [k for k in spec["keep"] if k.startswith(hidden + "/")]
        fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in kept]
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for k, fd in zip(kept, fds):
            os.makedirs(k, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, k, None, MS_BIND | MS_REC)
            os.close(fd)
    devices = ["null", "zero", "full", "random", "urandom"]
    fds = [os.open("/dev/" + d, os.O_PATH) for d in devices]
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "size=64k,mode=755")
    for d, fd in zip(devices, fds):
        open("/dev/" + d, "w").close()
        mount("/proc/self/fd/%d" % fd, "/dev/" + d, None, MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, "/dev/" + name)
    os.mkdir("/dev/shm")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | 8)  # this PID namespace's processes only
    # everything read-only in one call (mount_setattr, AT_FDCWD, "/", AT_RECURSIVE, MOUNT_ATTR_RDONLY|NOSUID)
    attr = (ctypes.c_uint64 * 4)(1 | 2, 0, 0, 0)
    if libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), ctypes.c_char_p(b"/"), ctypes.c_uint(0x8000),
                    ctypes.byref(attr), ctypes.c_size_t(32)) != 0:
        fail("making / read-only (mount_setattr, Linux >= 5.12): " + os.strerror(ctypes.get_errno()))
    for target in ("/tmp", "/dev/shm"):
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,mode=1777" % spec["tmp_bytes"])

def enter_namespaces():
    flags = 0x00020000 | 0x04000000 | 0x08000000 | 0x20000000 | 0x40000000  # mount, uts, ipc, pid, net
    if spec["map_ids"]:
        flags |= 0x10000000  # user: needed without root
    check(libc.unshare(flags), "unshare (namespaces)")
    if spec["map_ids"]:
        uid, gid = spec["map_ids"]
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", "%d %d 1" % (uid, uid))  # the same uid inside, never 0: exec drops all caps
        write("/proc/self/gid_map", "%d %d 1" % (gid, gid))
    pid = os.fork()
    if pid:  # stay outside as its parent, reap it, and leave
        report("pid %d" % pid)
        os.waitpid(pid, 0)
        os._exit(0)
    die_with_parent(0)  # pid 1 of a new PID namespace sees its parent as 0
    build_filesystem()

def start_program():
    os.closerange(3, status_fd)
    os.closerange(status_fd + 1, 65536)
    for res, soft, hard in spec["rlimits"]:
        resource.setrlimit(res, (soft, hard))
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
    if spec["setuid"]:
        uid, gid = spec["setuid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.chdir(spec["workdir"])
    os.execve(spec["python"], [spec["python"], "-I", "main.py"], spec["env"])

def main():
    die_with_parent(spec["parent"])
    try:
        write("/proc/self/oom_score_adj", "1000")
    except OSError:
        pass
    os.umask(0o022)
    source = b""
    while True:
        chunk = os.pread(spec["source_fd"], 1 << 20, len(source))
        if not chunk:
            break
        source += chunk
    os.close(spec["source_fd"])
    if spec["namespaces"]:
        enter_namespaces()
    with open(os.path.join(spec["workdir"], "main.py"), "wb") as f:
        f.write(source)
    deadline = time.monotonic() + spec["alarm_s"]
    def on_alarm(*_):  # the program (same uid, without root) may send SIGALRM too: only the real deadline counts
        if time.monotonic() >= deadline:
            os._exit(124)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, spec["alarm_s"], 1.0)
    pid = os.fork()
    if pid == 0:
        try:
            start_program()
        except BaseException as e:
            report("error starting the program: %r" % e)
        os._exit(127)
    while True:  # pid 1 reaps every orphan; the program's own status is the result
        try:
            done, status = os.wait()
        except ChildProcessError:
            os._exit(125)
        if done == pid:
            report("exit %d" % status)
            os._exit(0)

try:
    main()
except SystemExit:
    raise
except BaseException as e:
    fail("%s: %s" % (type(e).__name__, e))
"""
