"""recipe=eval_rsa end to end on a nano checkpoint: JSON per round, the plot, sweeps, every data source kind; and
the harness's numbers against hand-computed ones for a scripted generator whose answers are known."""

import dataclasses
import json
import os
import subprocess
import sys
from itertools import accumulate

import pytest
import torch

from zaya_train.cli import compose_run_config
from zaya_train.data import NANO_CHARS, ChainSumConfig, char_tokenizer, held_out_problems
from zaya_train.hf import save_pretrained
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rollout import RolloutEngine, RolloutResult
from zaya_train.rsa import template
from zaya_train.rsa.harness import plot_results, run_eval

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
    # The command line reached the run (SMALL's sizes), and invariants that hold for any population.
    assert {k: results["config"][k] for k in ("n", "c", "t", "beta", "tau")} == {"n": 3, "c": 2, "t": 2, "beta": 12,
                                                                                "tau": 4}
    assert results["num_problems"] == 2
    for r in results["rounds"]:
        assert 0 <= r["mean_accuracy"] <= r["pass_at_n"] <= 1 and 0 <= r["majority_accuracy"] <= r["pass_at_n"]
        assert 3 <= r["generated_tokens"] <= 3 * 12  # N = 3 rollouts of 1 to beta = 12 tokens per problem
    cumulative = list(accumulate(r["generated_tokens"] for r in results["rounds"]))
    assert [r["cumulative_generated_tokens"] for r in results["rounds"]] == pytest.approx(cumulative)
    assert (run_dir / "rsa_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_over_rounds(checkpoint, tmp_path):
    proc = cli("-m", f"checkpoint={checkpoint}", "eval.data=nano_chain_sum", "rsa.t=0,1", *SMALL,
               f"run_dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, rounds in (("0", 1), ("1", 2)):
        results = json.loads((tmp_path / "sweep" / job / "rsa_results.json").read_text())
        assert len(results["rounds"]) == rounds
        assert results["config"]["t"] == rounds - 1


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


# ---------------------------------------------------------------------------------------------------------------
# The harness's numbers against hand-computed ones: a scripted generator answers right or wrong on a fixed schedule.

N, C, T, BETA, FINAL_BETA, TAU, PROBLEMS = 4, 2, 2, 12, 16, 4, 3
# SCHEDULE[round][problem][candidate]: R right, W wrong ("001"), V another wrong ("002"), - no answer at all.
SCHEDULE = [
    ["RRW-", "WWRV", "----"],
    ["RRRW", "RWRW", "WV--"],
    ["RRRR", "RWV-", "RWW-"],
]
# By hand, per problem (mean of scores | majority: the most common answer's score, a tie averaging the tied
# answers, no answer no vote | pass@N), then the mean over the 3 problems:
#   round 0: RRW- 2/4 | R 2:1 -> 1 | 1     WWRV 1/4 | W 2:1:1 -> 0 | 1     ---- 0 | nobody -> 0 | 0
#            mean 0.75/3 = 1/4, majority 1/3, pass 2/3
#   round 1: RRRW 3/4 | 1 | 1     RWRW 2/4 | R 2 = W 2 -> (1 + 0)/2 | 1     WV-- 0 | W 1 = V 1 -> 0 | 0
#            mean 1.25/3 = 5/12, majority 1.5/3 = 1/2, pass 2/3
#   round 2: RRRR 1 | 1 | 1     RWV- 1/4 | R = W = V -> 1/3 | 1     RWW- 1/4 | W 2:1 -> 0 | 1
#            mean 1.5/3 = 1/2, majority (1 + 1/3)/3 = 4/9, pass 1
# Candidate i of problem k in round r writes (i + r + k) commas, 4 answer characters and EOS: i + r + k + 5
# tokens, so a problem's 4 candidates write 26 + 4r + 4k and the mean over k = 0, 1, 2 is 30 + 4r.
EXPECTED = [
    {"round": 0, "mean_accuracy": 1 / 4, "majority_accuracy": 1 / 3, "pass_at_n": 2 / 3, "generated_tokens": 30},
    {"round": 1, "mean_accuracy": 5 / 12, "majority_accuracy": 1 / 2, "pass_at_n": 2 / 3, "generated_tokens": 34},
    {"round": 2, "mean_accuracy": 1 / 2, "majority_accuracy": 4 / 9, "pass_at_n": 1.0, "generated_tokens": 38},
]


def rollout_result(token_ids: list[int]) -> RolloutResult:
    """A RolloutResult built from its dataclass fields by name, so a renamed routing field needs no change here
    (the harness reads only token_ids; routing tensors get one zero row per generated token)."""
    known = {"token_ids": token_ids, "logprobs": [-1.0] * len(token_ids), "finish_reason": "eos"}
    kwargs = {}
    for f in dataclasses.fields(RolloutResult):
        if f.name in known:
            kwargs[f.name] = known[f.name]
        elif "expert" in f.name:
            kwargs[f.name] = torch.zeros(len(token_ids), 1, dtype=torch.long)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise AssertionError(f"RolloutResult has a new required field {f.name!r}; give it a value here")
    return RolloutResult(**kwargs)


def test_eval_rsa_reports_hand_computed_metrics_for_a_scripted_generator(checkpoint, tmp_path, monkeypatch):
    tok = char_tokenizer(NANO_CHARS)

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    problems = held_out_problems(ChainSumConfig())[:PROBLEMS]
    questions = [enc(p.prompt) for p in problems]
    assert all(len(q) == 19 for q in questions)  # "Q" + six 2-digit terms + five "+" + "="
    bos, eos = tok.bos_token_id, tok.eos_token_id
    intro, before, outro = (
        enc(text) for text in (template.DEFAULT_INTRO, template.DEFAULT_BEFORE_CANDIDATES, template.DEFAULT_OUTRO)
    )
    headers = [enc(template.DEFAULT_CANDIDATE_HEADER.format(i=c + 1)) for c in range(C)]
    texts = {"W": "A001", "V": "A002", "-": "0000"}
    outputs: list[list[list[int]]] = []  # outputs[round][prompt index]
    budgets = []

    def scripted_generate(self, prompt_ids, max_new_tokens=256, **kwargs):
        r = len(outputs)  # the harness generates once per round, every prompt of every problem in one call
        budgets.append(max_new_tokens)
        assert len(prompt_ids) == PROBLEMS * N
        out = []
        for j, prompt in enumerate(prompt_ids):
            k, i = divmod(j, N)  # problem-major: candidate i of problem k
            if r == 0:
                assert prompt == [bos, *questions[k]], j
            else:  # BOS + the aggregation template around problem k's question and C tails from round r - 1
                head = [bos, *intro, *questions[k], *before]
                assert prompt[: len(head)] == head and prompt[len(prompt) - len(outro):] == outro, (r, j)
                body = prompt[len(head): len(prompt) - len(outro)]
                # the tail is taken after the candidate's EOS is stripped
                parents_tails = {tuple(o[:-1][-TAU:]) for o in outputs[r - 1][k * N: (k + 1) * N]}
                for header in headers:
                    assert body[: len(header)] == header, (r, j)
                    assert tuple(body[len(header): len(header) + TAU]) in parents_tails, (r, j)
                    body = body[len(header) + TAU:]
                assert body == [], (r, j)
            code = SCHEDULE[r][k][i]
            text = "," * (i + r + k) + ("A" + problems[k].answer if code == "R" else texts[code])
            ids = [*enc(text), eos]
            assert len(ids) == i + r + k + 5 <= max_new_tokens
            out.append(ids)
        outputs.append(out)
        return [rollout_result(ids) for ids in out]

    monkeypatch.setattr(RolloutEngine, "generate", scripted_generate)
    run_dir = tmp_path / "run"
    cfg = compose_run_config("eval_rsa", [
        f"checkpoint={checkpoint}", "eval.data=nano_chain_sum", f"eval.num_problems={PROBLEMS}", f"rsa.n={N}",
        f"rsa.c={C}", f"rsa.t={T}", f"rsa.beta={BETA}", f"rsa.final_beta={FINAL_BETA}", f"rsa.tau={TAU}",
        "rsa.template=text", "wandb.mode=disabled", "eval.progress_bar=false", f"run_dir={run_dir}",
    ])
    summary = run_eval(cfg, run_dir)

    assert len(outputs) == T + 1
    assert budgets == [BETA, BETA, FINAL_BETA]  # beta before the last round, final_beta in it
    results = json.loads((run_dir / "rsa_results.json").read_text())
    assert results["num_problems"] == PROBLEMS
    rounds = results["rounds"]
    assert [{key: r[key] for key in EXPECTED[0]} for r in rounds] == [pytest.approx(e, abs=1e-12) for e in EXPECTED]
    assert [r["cumulative_generated_tokens"] for r in rounds] == pytest.approx([30, 64, 102])
    # Round 0's prompt is BOS + the question. An aggregation prompt, as built (the harness adds BOS when it calls
    # the engine), is the template's pieces + the question + C tails of TAU tokens: the Markovian bound.
    overhead = len(intro) + len(before) + sum(len(h) for h in headers) + len(outro)
    assert [r["max_prompt_tokens"] for r in rounds] == [1 + 19] + [overhead + 19 + C * TAU] * T
    assert summary["rounds"] == rounds
