"""Two-process CPU training (torchrun + gloo) at ZeRO stages 1-3: the loss falls, ranks agree, and a run resumes
at another world size at the same data position with the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("run_driver.py")
COMMON = [
    "trainer.log_interval=1", "trainer.progress_bar=false", "wandb.mode=disabled", "schedule.warmup_steps=2",
    "data.micro_batch_size=16",
]


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(DRIVER.parents[2])}


def run(nproc: int, result: Path, *overrides: str, port: int) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(DRIVER), str(result), *COMMON, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               str(DRIVER), str(result), *COMMON, *overrides]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(result.read_text())


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "event" not in r}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_learn_and_agree(tmp_path, stage):
    run_dir = tmp_path / "run"
    result = run(2, tmp_path / "result.json", f"deepspeed=zero{stage}", "trainer.max_steps=30",
                 "trainer.save_interval=30", f"run_dir={run_dir}", port=29600 + stage)
    assert result["step"] == 30
    by_step = losses(run_dir)
    first, last = sum(by_step[s] for s in (1, 2, 3)) / 3, sum(by_step[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert result["max_params_diff"] == 0.0
    assert result["max_biases_diff"] == 0.0
    assert result["biases_moved"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_muon_trains_at_zero_stages(tmp_path, stage):
    """Stage 0 (fp32) runs torch's Muon as a client optimizer; stages 1-3 run DeepSpeed's own Muon."""
    run_dir = tmp_path / "run"
    result = run(2, tmp_path / "result.json", f"deepspeed=zero{stage}", "optim=muon", "trainer.max_steps=20",
                 "trainer.save_interval=20", "trainer.eval_problems=0", f"run_dir={run_dir}", port=29620 + stage)
    by_step = losses(run_dir)
    assert by_step[20] < by_step[1] - 0.8, f"Muon did not train: {by_step[1]:.3f} -> {by_step[20]:.3f}"
    assert result["max_params_diff"] == 0.0 and result["max_biases_diff"] == 0.0


def test_resume_two_ranks_on_one(tmp_path):
    """2 ranks x 16 windows stop at step 6; 1 rank x 32 windows (the same global batch) continues to step 9 and
    matches a 2-rank run that never stopped: same weights, same data position."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(2, tmp_path / "a.json", "deepspeed=zero1", "trainer.max_steps=9", "trainer.save_interval=6",
        "schedule.total_steps=9", f"run_dir={straight}", port=29611)
    run(2, tmp_path / "b.json", "deepspeed=zero1", "trainer.max_steps=6", "trainer.save_interval=6",
        "schedule.total_steps=9", f"run_dir={resumed}", port=29612)
    result = run(1, tmp_path / "c.json", "deepspeed=zero1", "trainer.max_steps=9", "trainer.save_interval=6",
                 "schedule.total_steps=9", "data.micro_batch_size=32", f"run_dir={resumed}", port=0)
    assert result["step"] == 9
    want, got = losses(straight), losses(resumed)
    for step in (7, 8, 9):
        assert got[step] == pytest.approx(want[step], abs=2e-4), (step, got[step], want[step])
    state = json.loads((resumed / "checkpoints" / "step_00000009" / "data_state.json").read_text())
    want_state = json.loads((straight / "checkpoints" / "step_00000009" / "data_state.json").read_text())
    assert state == want_state
