"""The Markovian RSA evaluation harness behind `zaya-train recipe=eval_rsa`.

    zaya-train recipe=eval_rsa checkpoint=runs/nano/... rsa.n=8 rsa.c=4 rsa.t=2 rsa.beta=64 rsa.tau=16 \\
        eval.data=nano_chain_sum eval.num_problems=100
    zaya-train -m recipe=eval_rsa checkpoint=... rsa.t=0,1,2 rsa.tau=8,16      # a sweep, overlaid in one plot

`checkpoint` is a run directory (its latest checkpoint), a trainer checkpoint or an HF `zaya` directory with its
tokenizer. `eval.data` is `rg:<task>` (a reasoning-gym task generated offline; the default), `nano_chain_sum`
(the nano task's held-out problems), `nano_chain_sum:validation` (200 other problems no run trains on), a local jsonl file with `question` and `answer` fields, or
`hub:<name>` (a hub dataset with the same fields; real runs only). Writes `run_dir/rsa_results.json` (one object per
round, round 0 first), `run_dir/rsa_accuracy.png` (mean and majority accuracy against generated tokens per problem,
one point per round; every `rsa_results.json` of the sweep is overlaid) and `metrics.jsonl`/wandb rows per round.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from zaya_train.loading import load_model_and_tokenizer
from zaya_train.metrics import MetricsSink
from zaya_train.rewards import ExactMatchVerifier, MathVerifier, ReasoningGymVerifier
from zaya_train.rollout import RolloutEngine
from zaya_train.rsa.core import RSAProblem, run_rsa, verifier_scorer
from zaya_train.rsa.metrics import RESULTS_FILE, write_results
from zaya_train.rsa.template import build_template

PLOT_FILE = "rsa_accuracy.png"
# The nano task's 200 held-out problems, and 200 validation problems for choosing settings without touching them.
NANO_SPLITS = ("nano_chain_sum", "nano_chain_sum:validation")


def load_problems(data: str, num_problems: int, seed: int) -> tuple[list[tuple[str, Any]], Any]:
    """(question, reference) pairs and the verifier that scores them."""
    if data.startswith("rg:"):
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(data[3:], size=num_problems, seed=seed)
        return [(entry["question"], entry) for entry in dataset], ReasoningGymVerifier(dataset)
    if data in NANO_SPLITS:
        from zaya_train.data import ChainSumConfig, held_out_problems, validation_problems

        split = validation_problems if data == "nano_chain_sum:validation" else held_out_problems
        problems = split(ChainSumConfig())[:num_problems]
        return [(p.prompt, p.answer) for p in problems], ExactMatchVerifier(answer_marker="A")
    if data.startswith("hub:"):
        import datasets

        rows = datasets.load_dataset(data[4:], split="test").select(range(num_problems))
    else:
        rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()][:num_problems]
    return [(row["question"], str(row["answer"])) for row in rows], MathVerifier()


def run_eval(cfg, run_dir: Path, overlay_dir: Path | None = None) -> dict[str, Any]:
    """`cfg` is the run config (`checkpoint`, `rsa`, `eval`). The plot overlays every result found one level
    below `overlay_dir` (a sweep's directory) with this run's. Returns the results path and the rounds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(cfg.checkpoint)  # run dir, trainer checkpoint or HF dir
    model.eval()
    pairs, verifier = load_problems(cfg.eval.data, cfg.eval.num_problems, cfg.seed)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    problems = [
        RSAProblem(problem_id=i, prompt_ids=bos + encode(question), question_ids=encode(question), reference=reference)
        for i, (question, reference) in enumerate(pairs)
    ]
    template = build_template(cfg.rsa.template, encode, max_candidates=cfg.rsa.c)
    engine = RolloutEngine(model)
    rounds_bar = tqdm(total=cfg.rsa.t + 1, desc=f"Markovian RSA, {len(problems)} problems x N={cfg.rsa.n}",
                      unit="round", disable=not cfg.eval.progress_bar)

    def generate(prompts: list[list[int]], max_new_tokens: int | list[int], seed: int):
        results = engine.generate(
            [bos + p if p[: len(bos)] != bos else p for p in prompts], max_new_tokens=max_new_tokens,
            temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, top_k=cfg.eval.top_k, seed=seed,
            max_batch_size=cfg.eval.max_batch_size,
        )
        rounds_bar.update(1)
        return results

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    rsa = cfg.rsa.stripping([tokenizer.eos_token_id])
    result = run_rsa(problems, generate, verifier_scorer(verifier, decode), rsa, template)
    rounds_bar.close()
    path = write_results(result, run_dir)
    with MetricsSink(run_dir, cfg.wandb, run_config=cfg) as sink:
        for metrics in result.rounds:
            values = {f"rsa/{k}": v for k, v in vars(metrics).items() if k != "round" and not isinstance(v, list)}
            sink.log(metrics.round, float("nan"), {**values, "event": "rsa_round"})
    others = sorted(overlay_dir.glob(f"*/{RESULTS_FILE}")) if overlay_dir is not None else []
    plot_results(sorted({*others, path}), run_dir / PLOT_FILE)
    return {"results": str(path), "rounds": [vars(m) for m in result.rounds]}


def _label(config: dict[str, Any]) -> str:
    return f"N={config['n']} C={config['c']} T={config['t']} beta={config['beta']} tau={config['tau']} ({config['variant']})"


def plot_results(result_files: Sequence[Path], out: Path) -> Path:
    """Accuracy against generated tokens per problem (cumulative), one point per round, one line per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for file in result_files:
        payload = json.loads(Path(file).read_text())
        rounds = payload["rounds"]
        cost = [r["cumulative_generated_tokens"] for r in rounds]
        line = ax.plot(cost, [r["mean_accuracy"] for r in rounds], marker="o", label=_label(payload["config"]))[0]
        ax.plot(cost, [r["majority_accuracy"] for r in rounds], linestyle="--", color=line.get_color(), alpha=0.6)
        for r, x in zip(rounds, cost):
            ax.annotate(f"t={r['round']}", (x, r["mean_accuracy"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("generated tokens per problem (cumulative)")
    ax.set_ylabel("accuracy (solid: population mean, dashed: majority vote)")
    ax.set_title("Markovian RSA: accuracy against compute")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
