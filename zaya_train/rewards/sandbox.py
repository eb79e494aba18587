"""Run untrusted Python programs in a throwaway sandbox made of Linux namespaces, a fresh uid and rlimits.

    from zaya_train.rewards.sandbox import SandboxLimits, run_python
    runs = run_python("print(int(input()) * 2)", ["21\\n", "x\\n"], SandboxLimits(time_limit_s=2))
    [(r.status, r.stdout) for r in runs]     # -> [("ok", b"42\\n"), ("crashed", b"")]

One call is one job: the program runs once per input, each time as a fresh process reading that input on stdin,
and the call returns one `Execution` per input: a status (`ok`, `crashed` for a nonzero exit, `timeout`, `memory`,
`output_limit`), the stdout up to the cap, the end of stderr. The runs of a job share one sandbox start-up.

How. util-linux `unshare` starts this file, as a small supervisor, in new mount, PID, network and IPC namespaces
(plus a user namespace that maps the caller to root when the caller is not root). The supervisor is pid 1 there:
- it makes every mount read-only in its mount namespace and hides /root and /home behind empty tmpfs (binding the
  Python installation back, read-only, when it lives there);
- for each input it mounts a fresh size-capped tmpfs on /tmp and /dev/shm (the program's working directory and the
  only places it can write), and starts the program under `setpriv` with no capabilities, no_new_privs and, when
  the caller is root, a fresh unprivileged uid; with an empty environment, stdin from memory and RLIMIT_CPU, AS,
  FSIZE, NPROC, NOFILE and CORE set; the interpreter runs as `python -I -S` (standard library only);
- it reads stdout up to the cap, keeps the end of stderr, enforces the wall-clock limit, and once the program's
  main process has ended or been killed, SIGKILLs every other process in the namespace, reaps them and unmounts
  the tmpfs, so nothing the program started or wrote outlives its run.
When the job ends the supervisor exits and the kernel kills whatever is left in its PID namespace; the caller
SIGKILLs the whole process group if the supervisor itself overruns its deadline.

The uid (root callers): RLIMIT_NPROC counts a uid's processes across the host, so each job gets its own uid, drawn
from [0x78000000, 0x79000000) (outside the ranges Debian, systemd and sssd allocate by default): its process cap is
its own and jobs cannot signal one another. Non-root callers run the program as the namespace's root with every
capability dropped; from Linux 5.14 the kernel counts RLIMIT_NPROC per user namespace, so the cap is the job's
own there too (older kernels count all of the caller's processes).

Threat model. It defends against programs that loop, allocate, print, write or fork without bound; that try to
write outside their directory, reach the network (loopback included), see or signal other processes, read the
caller's environment or home directories; or that leave processes, files or IPC objects behind. It is not a VM:
it shares the host kernel and does not defend against kernel exploits, CPU side channels (Spectre-class) or
timing attacks; the program can read the files outside /root and /home that its uid may read (world-readable
ones such as datasets and /etc; for non-root callers, also the caller's own); resources no rlimit covers (page
cache, kernel memory) are not bounded. Use a VM or gVisor for code that must not be trusted at all.

Requirements: Linux >= 5.3, util-linux `unshare` and `setpriv`, and namespaces open to the caller (root, or
unprivileged user namespaces). `isolation_status()` probes once per process by running a program end to end.
Without isolation `run_python` raises `IsolationUnavailable` saying why, unless `allow_unisolated=True`: then
the program runs with the rlimits and a temporary directory only, as the caller, able to read and write what the
caller can, to reach the network and to leave behind processes that escape its process group (and for a root
caller RLIMIT_NPROC does not bind). For trusted programs only.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import json
import math
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

# Module attributes, not constants inlined in commands, so a test can point them at a missing tool.
UNSHARE = shutil.which("unshare") or "unshare"
SETPRIV = shutil.which("setpriv") or "setpriv"

_UID_BASE, _UID_COUNT = 0x78000000, 1 << 24
_HIDDEN_DIRS = ("/root", "/home")
_WRITABLE_DIRS = ("/tmp", "/dev/shm")
_MAX_INODES = 4096
_PROGRAM_FILE = "solution.py"
_STDERR_TAIL = 4096
_READ_CHUNK = 1 << 16
_STARTUP_S = 30.0  # the caller's allowance for the supervisor to start and tear down, beyond the runs themselves
_PATH = "/usr/local/bin:/usr/bin:/bin"
_MEMORY_ERROR = re.compile(rb"MemoryError|Cannot allocate memory|out of memory", re.IGNORECASE)

# `-S` drops `site`, which is what defines exit() and quit(); programs call them, so they come back as sys.exit.
_PRELUDE = (
    "import builtins, sys\n"
    "builtins.exit = builtins.quit = sys.exit\n"
    f"sys.argv[:] = [{_PROGRAM_FILE!r}]\n"
    f"with open({_PROGRAM_FILE!r}, 'rb') as f:\n"
    f"    code = compile(f.read(), {_PROGRAM_FILE!r}, 'exec')\n"
    f"exec(code, {{'__name__': '__main__', '__file__': {_PROGRAM_FILE!r}, '__builtins__': builtins}})\n"
)

# mount(2) flags (linux/mount.h) and how statvfs reports the per-mount ones a read-only remount must keep: inside a
# user namespace the kernel refuses a remount that would clear nosuid, nodev, noexec or the atime mode.
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC = 1024, 2048, 4096, 16384
_MS_RELATIME, _MS_STRICTATIME = 1 << 21, 1 << 24
_MNT_DETACH = 2
_KEPT_FLAGS = (
    (os.ST_NOSUID, _MS_NOSUID),
    (os.ST_NODEV, _MS_NODEV),
    (os.ST_NOEXEC, _MS_NOEXEC),
    (os.ST_NOATIME, _MS_NOATIME),
    (os.ST_NODIRATIME, _MS_NODIRATIME),
    (os.ST_RELATIME, _MS_RELATIME),
)


@dataclass(frozen=True)
class SandboxLimits:
    time_limit_s: float = 5.0
    """CPU seconds per run (RLIMIT_CPU, rounded up to whole seconds)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS)."""
    max_output_bytes: int = 1 << 20
    """Stdout per run; a run that prints more is killed (`output_limit`)."""
    max_file_mb: int = 16
    """Size of any one file (RLIMIT_FSIZE) and of each writable directory (its tmpfs)."""
    max_processes: int = 32
    """Processes and threads of a job (RLIMIT_NPROC)."""
    max_open_files: int = 64
    wall_limit_s: float | None = None
    """Wall-clock seconds per run; None: twice `time_limit_s`, so a loaded host does not fail correct programs."""

    def __post_init__(self) -> None:
        for name in ("time_limit_s", "memory_mb", "max_output_bytes", "max_file_mb", "max_processes",
                     "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.wall_limit_s is not None and not self.wall_limit_s > 0:
            raise ValueError(f"wall_limit_s must be None or > 0, got {self.wall_limit_s!r}")

    @property
    def wall_s(self) -> float:
        return self.wall_limit_s if self.wall_limit_s is not None else 2.0 * self.time_limit_s


@dataclass(frozen=True)
class Execution:
    status: str
    """`ok` (exit 0), `crashed` (any other exit), `timeout` (CPU or wall clock), `memory`, `output_limit`."""
    stdout: bytes
    stderr_tail: bytes
    exit_code: int | None
    """The program's exit status; negative: the signal that ended it; None: it never reported one."""
    wall_s: float


@dataclass(frozen=True)
class Isolation:
    available: bool
    reason: str
    """Why not, when not available; else what isolates the programs."""


class SandboxError(RuntimeError):
    """The sandbox itself failed, not the program."""


class IsolationUnavailable(SandboxError):
    """This machine cannot isolate programs (and running them unisolated was not allowed)."""


# ----------------------------------------------------------------------------------------------- the caller's side


def run_python(
    source: str, inputs: Sequence[str], limits: SandboxLimits = SandboxLimits(), *, allow_unisolated: bool = False
) -> list[Execution]:
    """Runs `source` once per input (on stdin); one Execution per input, in order.

    Raises IsolationUnavailable when the machine cannot isolate it and `allow_unisolated` is off, SandboxError when
    the sandbox fails to start; whatever the program does is reported in its Execution, never raised.
    """
    if not inputs:
        return []
    isolation = isolation_status()
    if isolation.available:
        job = _job(source, inputs, limits, isolated=True)
        return _run_supervisor([*_unshare_command(), *_supervisor_command()], job, limits)
    if not allow_unisolated:
        raise IsolationUnavailable(isolation.reason)
    with tempfile.TemporaryDirectory(prefix="zaya-sandbox-", ignore_cleanup_errors=True) as workdir:
        job = {**_job(source, inputs, limits, isolated=False), "workdir": workdir}
        return _run_supervisor(_supervisor_command(), job, limits)


_probe_lock = threading.Lock()
_probes: dict[tuple[str, str], Isolation] = {}


def isolation_status() -> Isolation:
    """Whether programs can run isolated here, probed once per process (and per `UNSHARE` / `SETPRIV` path)."""
    key = (UNSHARE, SETPRIV)
    with _probe_lock:
        if key not in _probes:
            _probes[key] = _probe()
        return _probes[key]


def _probe() -> Isolation:
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return Isolation(False, f"the sandbox needs Linux >= 5.3 and Python's os.pidfd_open (platform {sys.platform})")
    for tool in (UNSHARE, SETPRIV):
        if shutil.which(tool) is None:
            return Isolation(False, f"util-linux {os.path.basename(tool)!r} not found (looked for {tool!r})")
    limits = SandboxLimits(time_limit_s=10.0)
    try:
        [run] = _run_supervisor([*_unshare_command(), *_supervisor_command()],
                                _job("print('ok')", [""], limits, isolated=True), limits)
    except SandboxError as err:
        return Isolation(False, f"namespaces are not available: {err}")
    if run.status != "ok" or run.stdout != b"ok\n":
        stderr = run.stderr_tail.decode("utf-8", "replace").strip()
        return Isolation(False, f"a probe program failed in the sandbox ({run.status}): {stderr}")
    mode = "a fresh uid" if os.geteuid() == 0 else "a user namespace, no capabilities"
    return Isolation(True, f"mount, PID, network and IPC namespaces; {mode}; rlimits")


def _interpreter() -> str:
    """The real interpreter behind this (possibly virtual-environment) Python: `-I -S` needs no venv."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _exposed_paths(interpreter: str) -> list[str]:
    """Directories the program's interpreter needs, outermost first, none inside another."""
    candidates = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)} | {os.path.dirname(interpreter)}
    kept: list[str] = []
    for path in sorted(candidates, key=len):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _job(source: str, inputs: Sequence[str], limits: SandboxLimits, isolated: bool) -> dict:
    interpreter = _interpreter()

    def encode(text: str) -> str:
        return base64.b64encode(text.encode("utf-8", "replace")).decode("ascii")

    return {
        "isolated": isolated,
        "uid": _UID_BASE + secrets.randbelow(_UID_COUNT) if isolated and os.geteuid() == 0 else None,
        "python": interpreter,
        "setpriv": shutil.which(SETPRIV) or SETPRIV,
        "expose": _exposed_paths(interpreter),
        "limits": {**asdict(limits), "wall_s": limits.wall_s},
        "source": encode(source),
        "inputs": [encode(text) for text in inputs],
    }


def _unshare_command() -> list[str]:
    # Non-root callers need a user namespace to own the others; root keeps real root so it can pick the uid.
    userns = ["--map-root-user"] if os.geteuid() != 0 else []
    return [UNSHARE, *userns, "--mount", "--propagation=private", "--mount-proc", "--pid", "--fork", "--kill-child",
            "--net", "--ipc"]


def _supervisor_command() -> list[str]:
    return [_interpreter(), "-I", "-S", os.path.abspath(__file__)]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _run_supervisor(command: list[str], job: dict, limits: SandboxLimits) -> list[Execution]:
    n = len(job["inputs"])
    deadline = _STARTUP_S + n * (limits.wall_s + 1.0)
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={}, start_new_session=True)
    overran = False
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=deadline)
    except subprocess.TimeoutExpired:
        overran = True
        _kill_group(proc.pid)  # before reaping the leader, so the group id cannot have been reused
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()
    runs = _parse_runs(out)
    if not runs and proc.returncode != 0 and not overran:
        message = err.decode("utf-8", "replace").strip()[-2000:]
        raise SandboxError(f"the sandbox exited with status {proc.returncode}: {message}")
    # Runs the supervisor never reported: it was killed at its deadline, or it broke.
    status = "timeout" if overran else "crashed"
    missing = Execution(status, b"", err[-_STDERR_TAIL:], None, 0.0)
    return runs[:n] + [missing] * (n - len(runs))


def _parse_runs(out: bytes) -> list[Execution]:
    runs = []
    for line in out.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            break
        runs.append(Execution(r["status"], base64.b64decode(r["stdout"]), base64.b64decode(r["stderr"]),
                              r["exit_code"], r["wall_s"]))
    return runs


# -------------------------------------------------------------------------------- the supervisor, inside the sandbox


def _supervise() -> int:
    job = json.loads(sys.stdin.buffer.read())
    os.umask(0o022)
    os.chdir("/")
    exposed: dict[str, int] = {}
    if job["isolated"]:
        if os.getpid() != 1:
            # kill(-1) below is only confined to the job as pid 1 of its own PID namespace.
            raise SystemExit("the supervisor must run as pid 1 of a new PID namespace")
        exposed = _seal_filesystem(job["expose"])
    source = base64.b64decode(job["source"])
    for stdin in job["inputs"]:
        with _workdir(job, exposed) as workdir:
            with open(os.path.join(workdir, _PROGRAM_FILE), "wb") as f:
                f.write(source)
            result = _execute(job, workdir, base64.b64decode(stdin))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    def c(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    if _libc().mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(options)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {target}: {os.strerror(code)}")


def _umount(target: str) -> None:
    if _libc().umount2(os.fsencode(target), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {target}: {os.strerror(code)}")


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", "rb") as f:
        fields = [line.split()[4] for line in f]
    # mountinfo escapes spaces, tabs, newlines and backslashes in paths as octal.
    return [os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), p)) for p in fields]


def _remount_readonly(path: str) -> None:
    flags = os.statvfs(path).f_flag
    if flags & os.ST_RDONLY:
        return
    ms = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
    for st_flag, ms_flag in _KEPT_FLAGS:
        if flags & st_flag:
            ms |= ms_flag
    if not flags & (os.ST_NOATIME | os.ST_RELATIME):
        ms |= _MS_STRICTATIME
    _mount(None, path, None, ms)


def _is_writable_mount(path: str) -> bool:
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:  # hidden under a tmpfs of ours: out of the program's reach
        return False


def _cover(target: str, options: str, exposed: dict[str, int]) -> None:
    """An empty tmpfs over `target`, with the exposed directories beneath it bound back read-only."""
    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    for path, fd in exposed.items():
        if path.startswith(target.rstrip("/") + "/"):
            os.makedirs(path, exist_ok=True)
            # The original is hidden now; the descriptor opened before the cover still reaches it.
            _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
            _remount_readonly(path)


def _seal_filesystem(expose: list[str]) -> dict[str, int]:
    """Hides the home directories and makes every mount read-only; returns the exposed directories' descriptors."""
    exposed = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in expose}
    for hidden in _HIDDEN_DIRS:
        if os.path.isdir(hidden):
            _cover(hidden, "size=1m,mode=0755", exposed)
    mounts = _mount_points()
    for path in mounts:
        # A failure here is judged by the check below: a mount hidden under a cover, or a path that is no longer
        # a mount's root, needs nothing; anything the program could still write to fails the job.
        with contextlib.suppress(OSError):
            _remount_readonly(path)
    writable = [p for p in mounts if _is_writable_mount(p)]
    if writable:
        raise SystemExit(f"cannot make these mounts read-only: {writable}")
    return exposed


@contextlib.contextmanager
def _workdir(job: dict, exposed: dict[str, int]) -> Iterator[str]:
    """A fresh, empty, writable working directory for one run; it and everything in it is gone afterwards."""
    if not job["isolated"]:
        workdir = tempfile.mkdtemp(dir=job["workdir"])
        try:
            yield workdir
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    owner = f",uid={job['uid']},gid={job['uid']}" if job["uid"] is not None else ""
    options = f"size={job['limits']['max_file_mb']}m,nr_inodes={_MAX_INODES},mode=0700{owner}"
    covered = [d for d in _WRITABLE_DIRS if os.path.isdir(d)]
    for target in covered:
        _cover(target, options, exposed)
    try:
        yield covered[0]
    finally:
        for target in reversed(covered):
            _umount(target)


def _program_command(job: dict) -> list[str]:
    python = [job["python"], "-I", "-S", "-c", _PRELUDE]
    if not job["isolated"]:
        return python
    uid = job["uid"]
    drop_user = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
    return [job["setpriv"], *drop_user, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *python]


def _set_rlimits(limits: dict) -> None:
    """In the program's process before exec; hard limits equal soft ones so the program cannot raise them."""
    cpu = math.ceil(limits["time_limit_s"])
    mb = 1 << 20
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mb),
        (resource.RLIMIT_NPROC, limits["max_processes"]),
        (resource.RLIMIT_NOFILE, limits["max_open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))
    # SIGXCPU at the soft limit tells a CPU timeout apart; SIGKILL a second later if the program ignores it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("stdin")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _kill_others(child: subprocess.Popen, isolated: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if isolated:
            os.kill(-1, signal.SIGKILL)  # from pid 1: every process of the namespace but itself
        else:
            os.killpg(child.pid, signal.SIGKILL)


def _reap_namespace() -> None:
    """Waits for every process of the namespace; orphans are pid 1's children, so none is missed."""
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _collect(child: subprocess.Popen, limits: dict, isolated: bool) -> tuple[str | None, bytes, bytes]:
    """Reads the program's output until its main process has ended and every writer is gone, or a limit is hit;
    returns (the limit hit, if any; stdout up to the cap; the end of stderr). Kills the rest on the way out."""
    cap, deadline = limits["max_output_bytes"], time.monotonic() + limits["wall_s"]
    stdout, stderr = bytearray(), bytearray()
    pidfd = os.pidfd_open(child.pid)
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ, stdout)
    selector.register(child.stderr, selectors.EVENT_READ, stderr)
    selector.register(pidfd, selectors.EVENT_READ, None)
    exited, limit = False, None
    try:
        while selector.get_map() and limit is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Past the deadline after the main process ended, only stray writers (unisolated) are left.
                limit = None if exited else "timeout"
                break
            for key, _ in selector.select(remaining):
                if key.data is None:
                    exited = True
                    selector.unregister(pidfd)
                    # Background processes may hold stdout open; they die with the main one.
                    _kill_others(child, isolated)
                    continue
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if key.data is stdout and len(stdout) > cap:
                    limit = "output_limit"
                    break
                if key.data is stderr and len(stderr) > 2 * _STDERR_TAIL:
                    del stderr[:-_STDERR_TAIL]
    finally:
        selector.close()
        os.close(pidfd)
        _kill_others(child, isolated)
    return limit, bytes(stdout[:cap]), bytes(stderr[-_STDERR_TAIL:])


def _classify(limit: str | None, exit_code: int, stderr: bytes) -> str:
    if limit is not None:
        return limit
    if exit_code == 0:
        return "ok"
    if exit_code == -signal.SIGXCPU:
        return "timeout"
    if _MEMORY_ERROR.search(stderr):
        return "memory"
    return "crashed"


def _execute(job: dict, workdir: str, stdin: bytes) -> dict:
    limits, isolated = job["limits"], job["isolated"]
    env = {"PATH": _PATH, "HOME": workdir, "TMPDIR": workdir}
    stdin_fd = _memfd(stdin)
    started = time.monotonic()
    try:
        child = subprocess.Popen(
            _program_command(job), stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
            env=env, close_fds=True, start_new_session=True,
            preexec_fn=functools.partial(_set_rlimits, limits),  # noqa: PLW1509 (the supervisor has one thread)
        )
    finally:
        os.close(stdin_fd)
    with child:
        limit, stdout, stderr = _collect(child, limits, isolated)
        exit_code = child.wait()  # before reaping the namespace, which would take the status away from Popen
    if isolated:
        _reap_namespace()
    return {
        "status": _classify(limit, exit_code, stderr),
        "exit_code": exit_code,
        "wall_s": round(time.monotonic() - started, 4),
        "stdout": base64.b64encode(stdout).decode("ascii"),
        "stderr": base64.b64encode(stderr).decode("ascii"),
    }


if __name__ == "__main__":
    sys.exit(_supervise())
