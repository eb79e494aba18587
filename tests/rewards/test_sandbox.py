"""The sandbox's isolation, observed from outside: processes in /proc, files on disk, a server's socket, the
environment. Each sandboxed call runs under a hang guard (a thread joined with a generous timeout)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from zaya_train.rewards import sandbox
from zaya_train.rewards.sandbox import IsolationUnavailable, SandboxLimits, isolation_status, run_python

HANG_GUARD_S = 120.0

needs_isolation = pytest.mark.skipif(
    not isolation_status().available, reason=f"no isolation on this machine: {isolation_status().reason}"
)


def finishes(fn, *args, timeout_s: float = HANG_GUARD_S, **kwargs):
    """fn(*args, **kwargs), failing the test instead of hanging it if it does not return within timeout_s."""
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 (re-raised in the test's thread)
            outcome["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def processes_with(marker: str) -> list[int]:
    """Pids of the host's processes whose name or command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{entry}/comm").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if marker.encode() in name or marker.encode() in cmdline:
                found.append(int(entry))
    return found


def marker() -> str:
    return f"zst{uuid.uuid4().hex[:12]}"  # fits the 15 characters of a process name


# Forks `n` children that leave the process group (setsid), rename themselves and sleep, then exits at once.
STORM = """
import ctypes, os, time
libc = ctypes.CDLL(None)
started = 0
for _ in range({n}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.setsid()
        libc.prctl(15, {name!r}.encode())  # PR_SET_NAME
        time.sleep(600)
        os._exit(0)
    started += 1
print(started)
"""


@needs_isolation
def test_each_input_runs_in_a_fresh_process_and_an_empty_directory():
    program = (
        "import os\n"
        "seen = os.listdir('.')\n"
        "open('state.txt', 'w').write(input())\n"
        "print(sorted(seen), open('state.txt').read())\n"
    )
    runs = finishes(run_python, program, ["first\n", "second\n"])
    assert [r.status for r in runs] == ["ok", "ok"]
    assert [r.stdout for r in runs] == [b"['solution.py'] first\n", b"['solution.py'] second\n"]


@needs_isolation
def test_a_process_storm_leaves_no_survivor():
    name = marker()
    runs = finishes(run_python, STORM.format(n=300, name=name), [""], SandboxLimits(max_processes=400))
    assert runs[0].status == "ok"
    assert int(runs[0].stdout) >= 250, "the storm did not happen"
    assert processes_with(name) == []


@needs_isolation
def test_max_processes_caps_a_fork_bomb_and_nothing_survives():
    name = marker()
    runs = finishes(run_python, STORM.format(n=1000, name=name), [""], SandboxLimits(max_processes=16))
    assert runs[0].status == "ok"
    assert 0 < int(runs[0].stdout) < 16
    assert processes_with(name) == []


@needs_isolation
def test_no_network_not_even_to_a_server_on_the_hosts_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
            "    print('connected')\n"
            "except OSError as err:\n"
            "    print('no connection:', err)\n"
        )
        [run] = finishes(run_python, program, [""])
        assert run.status == "ok"
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the server
        # ...although it was reachable from the host all along.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            server.setblocking(True)
            server.settimeout(5)
            server.accept()[0].close()


@needs_isolation
def test_writes_outside_its_directory_never_reach_the_host(tmp_path):
    token = uuid.uuid4().hex
    outside = [str(tmp_path / "escaped.txt"), f"/tmp/escaped-{token}", f"/dev/shm/escaped-{token}",
               f"/var/tmp/escaped-{token}", str(Path.cwd() / f"escaped-{token}")]
    program = (
        "import os\n"
        f"for path in {outside!r}:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('x')\n"
        "    except OSError:\n"
        "        pass\n"
        f"open('inside-{token}', 'w').write('written')\n"
        f"print(os.getcwd(), open('inside-{token}').read())\n"
    )
    [run] = finishes(run_python, program, [""])
    assert run.status == "ok"
    workdir, content = run.stdout.decode().split()
    assert content == "written"  # its own directory is writable...
    for path in [*outside, os.path.join(workdir, f"inside-{token}")]:
        assert not os.path.exists(path), path  # ...and nothing it wrote anywhere is left on the host


@needs_isolation
def test_the_callers_environment_is_invisible(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ZAYA_SANDBOX_SECRET", secret)
    program = (
        "import glob, os\n"
        "print(dict(os.environ))\n"
        "for path in glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
    )
    [run] = finishes(run_python, program, [""])
    assert run.status == "ok"
    assert b"ZAYA_SANDBOX_SECRET" not in run.stdout and secret.encode() not in run.stdout


@needs_isolation
def test_home_directories_are_hidden_but_for_the_interpreter():
    home = Path.home()
    if not os.access(home, os.W_OK):
        pytest.skip(f"cannot plant a file in {home} to look for")
    with tempfile.NamedTemporaryFile(dir=home, prefix="zaya-sandbox-"):
        program = f"import json, os\nprint(json.dumps(os.listdir({str(home)!r})))\n"
        [run] = finishes(run_python, program, [""])
    assert run.status == "ok"
    exposed = {Path(p).relative_to(home).parts[0] for p in sandbox._exposed_paths(sandbox._interpreter())
               if Path(p).is_relative_to(home)}
    assert set(json.loads(run.stdout)) <= exposed  # the planted file, like the rest of home, is not there


def test_refuses_without_isolation_unless_unisolated_runs_are_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "UNSHARE", "/nonexistent/unshare")
    status = isolation_status()
    assert not status.available and "unshare" in status.reason
    with pytest.raises(IsolationUnavailable, match="unshare"):
        run_python("print(1)", [""])
    program = "import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\nx = bytearray(10 * 1024**3)\n"
    [run] = finishes(run_python, program, [""], SandboxLimits(memory_mb=256), allow_unisolated=True)
    assert run.status == "memory"  # the rlimits still hold
    workdir = run.stdout.decode().strip()
    assert workdir and not os.path.exists(workdir)  # and its temporary directory is gone
