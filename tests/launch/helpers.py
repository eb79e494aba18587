"""Helpers for the launch-script tests: the environment the scripts run in, free ports, and a process tracker that
leaves nothing behind (torchrun starts every worker in a session of its own, so killing the launcher's process
group would miss them: every process a test starts carries a marker in its environment instead)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
TORCHRUN_SH = LAUNCH / "torchrun.sh"
SLURM_SBATCH = LAUNCH / "slurm.sbatch"
FAKE_SLURM = Path(__file__).with_name("fake_slurm")

# A short nano pretraining run: no held-out evaluation, no progress bar, no wandb, a loss row every step.
NANO = [
    "recipe=nano_pretrain", "trainer.eval_problems=0", "trainer.progress_bar=false", "wandb.mode=disabled",
    "trainer.log_interval=1", "schedule.warmup_steps=2", "data.micro_batch_size=8",
]


def script_env(**extra: str) -> dict[str, str]:
    """The caller's environment for a launch script: this venv's torchrun first on PATH, CPU DeepSpeed, offline, one
    thread per process (two "nodes" share 2 cores), no launcher variables inherited from the machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "RCCL_", "HSA_", "GPU_MAX", "HIP_", "TORCH_NCCL", "GLOO_"))
           and k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "ZAYA_ENV", "LOG_DIR",
                         "LOG_RANKS", "DRY_RUN", "NPROC_PER_NODE", "RUN_DIR", "ZAYA_ROOT", "OMP_NUM_THREADS")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
    })
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_rows(run_dir: Path) -> list[int]:
    """The steps of the loss rows in run_dir/metrics.jsonl, in the order they were written."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "event" not in r]


class Processes:
    """Starts launch scripts with a marker in their environment; `cleanup` TERMs then KILLs every live process that
    carries it (workers included, whoever their parent now is)."""

    def __init__(self, tmp_path: Path) -> None:
        self.marker = uuid.uuid4().hex
        self.tmp_path = tmp_path
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, cmd: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        out = self.tmp_path / f"{name}.out"
        handle = out.open("w")
        proc = subprocess.Popen(cmd, env={**env, "ZAYA_LAUNCH_TEST": self.marker}, stdout=handle,
                                stderr=subprocess.STDOUT, cwd=self.tmp_path, start_new_session=True)
        handle.close()
        self.started.append((proc, out))
        return proc

    def text(self, proc: subprocess.Popen) -> str:
        """Everything `proc` wrote to stdout and stderr so far."""
        out = next(out for started, out in self.started if started is proc)
        return out.read_text(errors="replace")

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pid {proc.pid} still running after {timeout}s:\n{self.text(proc)[-4000:]}")

    def alive(self) -> list[int]:
        """Live processes (not zombies) whose environment carries this test's marker."""
        needle = f"ZAYA_LAUNCH_TEST={self.marker}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            except OSError:
                continue
            pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            pids = self.alive()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                for proc, _ in self.started:
                    proc.poll()
                time.sleep(0.2)
        for proc, _ in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def wait_until(condition, timeout: float, procs: list[subprocess.Popen], tracker: Processes, what: str) -> None:
    """Polls `condition` until it holds; fails early, with the output, if one of `procs` has already exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"pid {proc.pid} exited {proc.returncode} before {what}:\n{tracker.text(proc)[-4000:]}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
