"""Checkpoint safety: SIGTERM stops and resumes bit-exactly; SIGKILL mid-write leaves the previous checkpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from zaya_train.loading import latest_checkpoint

DRIVER = Path(__file__).with_name("run_driver.py")
COMMON = [
    "trainer.log_interval=1", "trainer.progress_bar=false", "wandb.mode=disabled", "schedule.warmup_steps=2",
    "schedule.total_steps=12", "data.micro_batch_size=8", "trainer.max_steps=12",
]


def run(result: Path, run_dir: Path, *overrides: str, **fault_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(DRIVER.parents[2]), **fault_env}
    cmd = [sys.executable, str(DRIVER), str(result), *COMMON, f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def logged(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "event" not in r]


def test_sigterm_then_resume_gives_bitwise_identical_losses(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(tmp_path / "a.json", straight, "trainer.save_interval=100").returncode == 0
    first = run(tmp_path / "b.json", stopped, "trainer.save_interval=100", ZAYA_TEST_SIGTERM_AT_STEP="5")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["step"] == 5 and summary["reason"] == "signal SIGTERM"
    assert latest_checkpoint(stopped).name == "step_00000005"
    second = run(tmp_path / "c.json", stopped, "trainer.save_interval=100")
    assert second.returncode == 0, second.stderr[-3000:]
    want = logged(straight)
    got = logged(stopped)
    assert [s for s, _ in got] == list(range(1, 13))
    assert got == want  # floats compared exactly: fp32 on the CPU is deterministic


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    killed = run(tmp_path / "a.json", run_dir, "trainer.save_interval=4", ZAYA_TEST_SIGKILL_IN_CHECKPOINT="2")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert (checkpoints / ".tmp-step_00000008").is_dir(), "the interrupted write stays in its temporary directory"
    assert not (checkpoints / "step_00000008").exists()
    assert latest_checkpoint(run_dir).name == "step_00000004"

    resumed = run(tmp_path / "b.json", run_dir, "trainer.save_interval=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [s for s, _ in logged(run_dir)]
    assert steps == list(range(1, 9)) + list(range(5, 13)), "resume=auto restarts after step 4"
    first_run, second_run = dict(logged(run_dir)[:8]), dict(logged(run_dir)[8:])
    assert all(first_run[s] == second_run[s] for s in range(5, 9)), "the replayed steps see the same data"
    assert not (checkpoints / ".tmp-step_00000008").exists(), "a later checkpoint cleans the stale write"
