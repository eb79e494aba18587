"""How the loop steps and stops: non-finite losses and gradients skip the step and are counted (also under
gradient accumulation, without shifting DeepSpeed's accumulation boundary); too many in a row stop the run;
gradient accumulation equals one larger micro-batch; a finite data set ends the run with a checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zaya_train.train.engine import NonFiniteGuard

DRIVER = Path(__file__).with_name("run_driver.py")
COMMON = [
    "trainer.log_interval=1", "trainer.progress_bar=false", "wandb.mode=disabled", "schedule.warmup_steps=1",
    "trainer.save_interval=100", "trainer.eval_problems=0",
]


def run(tmp_path: Path, name: str, *overrides: str, **env: str) -> tuple[dict, list[dict]]:
    run_dir = tmp_path / name
    result = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(DRIVER), str(result), *COMMON, f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(DRIVER.parents[2]), **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return json.loads(result.read_text()), [r for r in rows if "event" not in r]


def test_nan_losses_are_skipped_and_counted(tmp_path):
    summary, rows = run(tmp_path, "nan", "trainer.max_steps=8", "data.micro_batch_size=8",
                        ZAYA_TEST_NAN_LOSS_STEPS="3,4")
    assert summary["step"] == 8
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["nonfinite_loss_micro_batches"] == 2
    assert all(r["loss"] == r["loss"] for r in rows if r["step"] not in (3, 4)), "other steps stay finite"


def test_nan_micro_batch_under_accumulation_keeps_deepspeed_in_step(tmp_path):
    """Micro-batch 3 is the first of step 2 (2 micro-batches a step). DeepSpeed steps the optimizer and the
    schedule when its own micro-step count reaches a multiple of 2: if the NaN micro-batch were not counted, every
    later step would end one micro-batch early and the learning rate would lag the schedule by a step."""
    overrides = ("trainer.max_steps=6", "data.micro_batch_size=4", "deepspeed.gradient_accumulation_steps=2",
                 "schedule.warmup_steps=3")
    _, clean = run(tmp_path, "clean", *overrides)
    summary, rows = run(tmp_path, "nan", *overrides, ZAYA_TEST_NAN_LOSS_STEPS="3")
    assert summary["step"] == 6
    assert [r["lr"] for r in rows] == [r["lr"] for r in clean]
    assert rows[-1]["nonfinite_loss_micro_batches"] == 1 and rows[-1]["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 1, 1], "the NaN micro-batch skips its whole step"
    assert rows[0]["loss"] == clean[0]["loss"]
    assert all(r["loss"] == r["loss"] for r in rows), "a step's loss is the mean of its finite micro-batches"


def test_finite_data_ends_the_run_with_a_checkpoint(tmp_path):
    """data.num_epochs=1 over 64 problems in micro-batches of 8: 8 steps, then the run stops and saves."""
    summary, rows = run(tmp_path, "epoch", "trainer.max_steps=100", "data.micro_batch_size=8", "data.num_samples=64",
                        "data.num_epochs=1")
    assert (summary["step"], summary["reason"]) == (8, "data_exhausted")
    assert rows[-1]["step"] == 8
    latest = tmp_path / "epoch" / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step_00000008"


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    summary, rows = run(tmp_path, "diverged", "trainer.max_steps=8", "data.micro_batch_size=8",
                        "trainer.max_nonfinite_in_row=3", ZAYA_TEST_NAN_LOSS_STEPS="2,3,4")
    assert "3 optimizer steps in a row" in summary["diverged"]
    assert rows[-1]["step"] <= 3
    assert not (tmp_path / "diverged" / "checkpoints").exists()


def test_gradient_accumulation_equals_one_larger_micro_batch(tmp_path):
    _, whole = run(tmp_path, "whole", "trainer.max_steps=5", "data.micro_batch_size=16")
    _, accumulated = run(tmp_path, "accumulated", "trainer.max_steps=5", "data.micro_batch_size=8",
                         "deepspeed.gradient_accumulation_steps=2")
    for a, b in zip(whole, accumulated):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guard_skips_a_non_finite_gradient_step(bad):
    param = torch.nn.Parameter(torch.ones(3))
    guard = NonFiniteGuard(torch.optim.SGD([param], lr=1.0), max_norm=1.0)
    param.grad = torch.tensor([1.0, bad, 0.0])
    guard.step()
    assert guard.skipped == 1 and torch.equal(param.detach(), torch.ones(3)) and param.grad is None
    param.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5, clipped to 1
    guard.step()
    assert guard.last_grad_norm == pytest.approx(5.0)
    torch.testing.assert_close(param.detach(), torch.tensor([1 - 0.6, 1 - 0.8, 1.0]))
