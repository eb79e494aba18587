"""`recipe=nano_cascade` end to end: every stage of the ZAYA1 RL cascade runs its own recipe from the stage before,
logs its own rewards, checkpoints, and a stage stopped by SIGTERM continues from its checkpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from zaya_train.cascade.config import CASCADE_STAGES

DRIVER = Path(__file__).with_name("sigterm_driver.py")
TOY = ["recipe=nano_cascade", "trainer.progress_bar=false", "wandb.mode=disabled", "cascade.pretrain_steps=20"]


def run(*args, cwd, env=None, expect=0, driver=False):
    command = [sys.executable, str(DRIVER)] if driver else [sys.executable, "-m", "zaya_train"]
    proc = subprocess.run([*command, *args], env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def keys(stage_dir: Path) -> set[str]:
    return set().union(*(r.keys() for r in rows(stage_dir)))


def test_every_stage_runs_logs_checkpoints_and_hands_over(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(*TOY, f"run_dir={run_dir}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == list(CASCADE_STAGES) and all(s["done"] for s in stages.values())
    previous = run_dir / "pretrain"
    for stage in list(CASCADE_STAGES)[1:]:
        stage_dir = run_dir / stage
        config = yaml.safe_load((stage_dir / "config.yaml").read_text())
        assert config["model"]["init_from"] == str(previous), stage
        assert (stage_dir / "checkpoints" / "step_00000002").is_dir(), stage
        assert [r["step"] for r in rows(stage_dir)] == [1, 2], stage
        previous = stage_dir
    # Each stage's own environments and what its verifiers reported.
    stage1 = keys(run_dir / "stage1_warmup")
    warmup_envs = {"knights_knaves", "zebra_puzzles", "sudoku", "arc_1d", "math", "enigmata"}
    logged = {k.removeprefix("reward/env/") for k in stage1 if k.startswith("reward/env/")}
    assert len(logged) >= 2 and logged <= warmup_envs and "reward/round1" in stage1
    assert {"prompts/filter_examined", "prompts/filter_dropped", "prompts/filter_kept"} <= stage1
    stage2 = keys(run_dir / "stage2_rlve")
    difficulties = {k for k in stage2 if k.startswith("curriculum/difficulty/")}
    assert len(difficulties) == 13 and "curriculum/mean_difficulty" in stage2
    for stage in ("stage3a_math_code_ttc", "stage3b_math_code_ttc"):
        found = keys(run_dir / stage)
        logged = {k.removeprefix("reward/env/") for k in found if k.startswith("reward/env/")}
        assert len(logged) >= 2 and logged <= {"math", "code", "codeio_output", "codeio_input"}, stage
        # Programs ran in the sandbox and their outcomes were counted.
        assert any(k.startswith(("outcomes/code/", "outcomes/codeio_input/")) for k in found), stage
    stage4 = keys(run_dir / "stage4_behavioral")
    assert "reward/env/behaviour" in stage4 and any(k.startswith("outcomes/behaviour/gate_") for k in stage4)
    # The reward model's scores are real-valued: behavioural RL updates the policy even at toy size.
    assert any(r.get("rl/optimizer_steps", 0) > 0 for r in rows(run_dir / "stage4_behavioral"))
    # All-zero groups everywhere else: dynamic sampling says so and the stage still finishes its steps.
    assert "dynamic sampling dropped every group" in out
    assert "nano cascade finished" in out


def test_a_stage_stopped_by_sigterm_continues_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TOY, "cascade.rl_steps=3", "cascade.stages=[pretrain,stage1_warmup,stage2_rlve]", f"run_dir={run_dir}"]
    stopped = run(*args, cwd=tmp_path, driver=True, expect=128 + signal.SIGTERM,
                  env={"CASCADE_SIGTERM_STAGE": "stage2_rlve", "CASCADE_SIGTERM_STEP": "1"})
    assert "continue with: zaya-train recipe=nano_cascade trainer.resume=auto" in stopped.stderr
    assert sorted(json.loads((run_dir / "stages.json").read_text())) == ["pretrain", "stage1_warmup"]
    interrupted = run_dir / "stage2_rlve"
    checkpoint = interrupted / "checkpoints" / "step_00000001"
    # The curriculum's state (difficulties and group counts per environment) is part of the checkpoint.
    (curriculum,) = json.loads((checkpoint / "data_state.json").read_text())["curricula"]
    assert len(curriculum["difficulty"]) == 13 and sum(curriculum["groups"].values()) > 0
    curriculum_at_stop = rows(interrupted)[-1]

    resumed = run(*args, "trainer.resume=auto", cwd=tmp_path).stdout
    assert "pretrain: finished in an earlier run" in resumed and "stage1_warmup: finished in an earlier run" in resumed
    steps = [r["step"] for r in rows(interrupted)]
    assert steps == [1, 2, 3]  # step 1 from the first run, 2 and 3 after the resume: no restart from step 1
    assert rows(interrupted)[0] == curriculum_at_stop
    assert (interrupted / "checkpoints" / "step_00000003").is_dir()
    assert json.loads((run_dir / "stages.json").read_text())["stage2_rlve"]["done"]
