"""recipe=warmstart: plain rows with worked solutions, aggregation rows built from the initial policy's own
candidates exactly as evaluation builds them (half cut to their answers), answer-only targets; the recipe runs."""

import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from zaya_train.cli import compose_run_config
from zaya_train.data.synthetic import ChainSumConfig, ChainSumDataset
from zaya_train.rl.warmstart import POOL_OFFSET, WarmStartSource
from zaya_train.train.engine import DistInfo


def source(policy, tmp_path, *overrides):
    cfg = compose_run_config("warmstart", [f"model.init_from={policy}", "rl.warmstart.pool_problems=3",
                                           "rl.warmstart.batch_size=8", "rl.max_new_tokens=24", "rsa.n=4",
                                           "rsa.c=2", "rsa.tau=6", *overrides])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    ws = WarmStartSource(cfg, tmp_path, info)
    ws.attach(SimpleNamespace(gradient_accumulation_steps=lambda: 1), info)
    return ws


def test_rows_mix_worked_solutions_and_aggregation_prompts_over_own_candidates(policy, tmp_path):
    ws = source(policy, tmp_path)
    tok = ws.tokenizer
    rows = ws._rows(step=3)
    assert len(rows) == 8
    plain, aggregation = rows[:4], rows[4:]
    bar, eos, bos = tok.convert_tokens_to_ids("|"), tok.eos_token_id, tok.bos_token_id
    data = ChainSumDataset(ChainSumConfig(), tokenizer=None, size=2**62, seed=0)
    for j, (prompt, target) in enumerate(plain):
        problem = data.problem(3 * 8 + j)
        assert tok.decode(prompt, skip_special_tokens=True) == problem.prompt and prompt[0] == bos
        assert tok.decode(target[:-1]) == problem.solution and target[-1] == eos
    assert {problem.problem_id for problem, _, _ in ws.pool} == {POOL_OFFSET, POOL_OFFSET + 1, POOL_OFFSET + 2}
    for j, (prompt, target) in enumerate(aggregation):
        problem, candidates, _ = next(e for e in ws.pool if prompt[: len(e[0].prompt_ids)] == e[0].prompt_ids)
        # By hand: EOS stripped; for the first half only the answer (from the last `A` on); the last tau tokens.
        shown = [[t for t in c if t != eos] for c in candidates]
        if j < 2:
            shown = [c[max(i for i, t in enumerate(c) if t == tok.convert_tokens_to_ids("A")):]
                     if tok.convert_tokens_to_ids("A") in c else c for c in shown]
        tails = [c[-6:] for c in shown]
        rest = prompt[len(problem.prompt_ids):]
        built = [[bar, *tails[a], bar, *tails[b], bar] for a in range(4) for b in range(4) if a != b]
        assert rest in built
        assert tok.decode(target[:-1]) == "A" + problem.reference and target[-1] == eos


def test_warmstart_recipe_trains(policy, tmp_path):
    driver = os.path.join(os.path.dirname(__file__), "..", "train", "run_driver.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.path.abspath(os.path.join(driver, "..", "..", ".."))}
    proc = subprocess.run(
        [sys.executable, driver, str(tmp_path / "r.json"), "recipe=warmstart", f"model.init_from={policy}",
         f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2", "rl.warmstart.pool_problems=4",
         "rl.warmstart.batch_size=8", "trainer.progress_bar=false", "wandb.mode=disabled", "rl.max_new_tokens=24",
         "schedule.warmup_steps=1"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert (tmp_path / "run" / "tokenizer").is_dir()
