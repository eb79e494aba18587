"""`zaya-train` end to end on tiny budgets and two RL seeds: every stage runs, the report, plot and HF export appear,
the arms stop at the same compute budget, and a second call on the same run directory skips what is finished."""

import json
import os
import subprocess
import sys

import pytest

from zaya_train.rsa.stats import paired_bootstrap_ci

TINY = ["experiment.pretrain_steps=30", "experiment.anneal_steps=5", "experiment.warmstart_steps=4",
        "experiment.warmstart_pool_problems=8", "experiment.rl_compute_tokens=12000",
        "experiment.plain_problems_per_step=4", "experiment.codesign_problems_per_step=4",
        "experiment.eval_problems=12", "experiment.eval_rounds=1", "trainer.progress_bar=false", "wandb.mode=disabled"]


def zaya_train(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "zaya_train", *args], env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          cwd=cwd, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tiny_main_job_writes_report_plot_and_export_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    out = zaya_train(*TINY, "seeds=[0,1]", f"run_dir={run_dir}", cwd=tmp_path)
    for name in ("report.md", "results.json", "rsa_scaling.png", "stages.json", "export/config.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "rsa_scaling.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results["models"]) == ["base", "codesign_rl", "plain_rl", "warmstart"]
    assert all(len(m["rounds"]) == 2 and m["num_problems"] == 12 for m in results["models"].values())
    # Equal compute: each arm stops at the first step that starts at or past the budget.
    for arm in ("plain_rl", "codesign_rl"):
        compute = results["compute"][arm]
        assert compute["total"] == compute["prefill"] + compute["decode"] + compute["trained"] >= 12000
    primary = results["paired"]["primary"]
    codesign, plain = results["models"]["codesign_rl"]["rounds"], results["models"]["plain_rl"]["rounds"]
    assert primary["ci"] == list(paired_bootstrap_ci(codesign[primary["codesign_round"]]["problem_mean_scores"],
                                                     plain[0]["problem_mean_scores"]))
    assert results["outcome"] in ("gain", "no detectable difference", "loss")
    # Two RL seeds from one base and warm start: per-seed figures, and pooled ones whose per-problem scores are the
    # seeds' mean.
    assert sorted(results["seeds"]) == ["0", "1"]
    for arm in ("plain_rl", "codesign_rl"):
        per_seed = [results["seeds"][s]["models"][arm]["rounds"][0]["problem_mean_scores"] for s in ("0", "1")]
        pooled = results["models"][arm]["rounds"][0]["problem_mean_scores"]
        assert pooled == [pytest.approx((a + b) / 2) for a, b in zip(*per_seed)]
    assert results["seeds"]["0"]["models"]["base"] == results["seeds"]["1"]["models"]["base"]
    report = (run_dir / "report.md").read_text()
    assert results["verdict"] in report and "rsa_scaling.png" in report
    export = results["run"]["export"]
    assert export["loaded_with"] == "transformers.AutoModelForCausalLM" and export["path"] in report
    assert "main job finished" in out

    again = zaya_train(*TINY, "seeds=[0,1]", f"run_dir={run_dir}", "trainer.resume=auto", cwd=tmp_path)
    stages = json.loads((run_dir / "stages.json").read_text())
    for key in stages:
        assert f"{key}: finished in an earlier run" in again
    assert json.loads((run_dir / "results.json").read_text())["models"] == results["models"]
