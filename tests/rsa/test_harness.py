"""recipe=eval_rsa end to end on a nano checkpoint: JSON per round, the plot, sweeps, every data source kind."""

import json
import os
import subprocess
import sys

import pytest

from zaya_train.data import NANO_CHARS, char_tokenizer
from zaya_train.hf import save_pretrained
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rsa.harness import plot_results

KEYS = {"mean_accuracy", "majority_accuracy", "pass_at_n", "generated_tokens", "max_prompt_tokens"}
SMALL = ["rsa.n=3", "rsa.c=2", "rsa.beta=12", "rsa.tau=4", "eval.num_problems=2", "wandb.mode=disabled",
         "eval.progress_bar=false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("nano_hf")
    save_pretrained(ZayaForCausalLM(preset("nano")), path)
    char_tokenizer(NANO_CHARS).save_pretrained(path)
    return path


def cli(*args, cwd):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "zaya_train", "recipe=eval_rsa", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("data", ["nano_chain_sum", "rg:chain_sum", "jsonl"])
def test_eval_rsa_writes_results_and_plot(checkpoint, tmp_path, data):
    if data == "jsonl":
        data = tmp_path / "problems.jsonl"
        data.write_text("\n".join(json.dumps({"question": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(3)))
    run_dir = tmp_path / "run"
    proc = cli(f"checkpoint={checkpoint}", f"eval.data={data}", "rsa.t=2", *SMALL, f"run_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "rsa_results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert all(KEYS <= set(r) for r in results["rounds"])
    assert all(0 <= r["mean_accuracy"] <= 1 for r in results["rounds"])
    assert (run_dir / "rsa_accuracy.png").stat().st_size > 0


def test_sweep_over_rounds(checkpoint, tmp_path):
    proc = cli("-m", f"checkpoint={checkpoint}", "eval.data=nano_chain_sum", "rsa.t=0,1", *SMALL,
               f"run_dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, rounds in (("0", 1), ("1", 2)):
        results = json.loads((tmp_path / "sweep" / job / "rsa_results.json").read_text())
        assert len(results["rounds"]) == rounds


def test_plot_overlays_configurations(tmp_path):
    files = []
    for t in (1, 2):
        rounds = [{"round": r, "mean_accuracy": 0.1 * r, "majority_accuracy": 0.2, "pass_at_n": 0.5,
                   "generated_tokens": 10.0, "max_prompt_tokens": 5, "cumulative_generated_tokens": 10.0 * (r + 1)}
                  for r in range(t + 1)]
        config = {"n": 4, "c": 2, "t": t, "beta": 8, "tau": 4, "variant": "markovian"}
        path = tmp_path / f"{t}.json"
        path.write_text(json.dumps({"config": config, "num_problems": 1, "rounds": rounds}))
        files.append(path)
    out = plot_results(files, tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_checkpoint_fails_fast(tmp_path):
    proc = cli("checkpoint=/nonexistent", cwd=tmp_path)
    assert proc.returncode == 2 and "checkpoint" in proc.stderr
