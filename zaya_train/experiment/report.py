"""The experiment's verdict: does co-design RL beat plain RL under Markovian RSA, and by how much?

    from zaya_train.experiment.report import build_results, write_outputs
    results = build_results({"base": base, "warmstart": warm}, {0: {"plain_rl": p, "codesign_rl": c}}, compute)
    write_outputs(results, run_dir)       # run_dir/results.json, rsa_scaling.png, report.md

Inputs are loaded `rsa_results.json` payloads (zaya_train.rsa.metrics). With several RL seeds an arm's figures are
pooled: each problem's score is averaged over seeds, so paired comparisons still pair problems. Every comparison
is a paired bootstrap over problems (zaya_train.rsa.stats, default seed): the per-problem lists are stored in
results.json, so each interval, the verdict and report.md can be recomputed from results.json alone.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np

from zaya_train.experiment.config import ARMS
from zaya_train.rsa.stats import bootstrap_ci, paired_bootstrap_ci, wilson_ci

MODELS = ("base", "warmstart", "plain_rl", "codesign_rl")
SPLIT_NAMES = {"test": "held-out", "validation": "validation"}
LABELS = {"base": "base", "warmstart": "warm start", "plain_rl": "plain RL", "codesign_rl": "co-design RL"}
COMPUTE_KEYS = ("prefill", "decode", "trained", "total")

_OUTCOME_PHRASES = {
    "gain": "a gain",
    "loss": "a loss",
    "no detectable difference": "no detectable difference at this sample size",
}
# The primary comparison is co-design against plain RL, so its outcome says who it helped or hurt.
_PRIMARY = {
    "gain": ("Co-design beat plain RL", "a gain (co-design helped)"),
    "loss": ("Co-design did not beat plain RL", "a loss (co-design hurt)"),
    "no detectable difference": ("Co-design did not detectably beat plain RL",
                                 "no detectable difference at this sample size"),
}


def outcome(ci: Sequence[float]) -> str:
    """A difference's outcome from its 95% interval: only an interval that excludes 0 counts."""
    if ci[0] > 0:
        return "gain"
    if ci[1] < 0:
        return "loss"
    return "no detectable difference"


def _paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    return {"diff": fmean(a) - fmean(b), "ci": list(paired_bootstrap_ci(a, b))}


def _judged(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    paired = _paired(a, b)
    return {**paired, "outcome": outcome(paired["ci"])}


def _pool_round(rounds: Sequence[dict[str, Any]], num_problems: int) -> dict[str, Any]:
    """One round pooled over seeds; majority and pass@N are proportions over problems x seeds."""
    means = np.mean([r["problem_mean_scores"] for r in rounds], axis=0).tolist()
    majorities = np.mean([r["problem_majority_scores"] for r in rounds], axis=0).tolist()
    trials = num_problems * len(rounds)

    def wilson(key: str) -> list[float]:
        # Summed floats can overshoot `trials` by an ulp, which wilson_ci would reject.
        return list(wilson_ci(min(sum(r[key] * num_problems for r in rounds), trials), trials))

    return {
        "round": rounds[0]["round"],
        "mean_accuracy": fmean(means),
        "majority_accuracy": fmean(r["majority_accuracy"] for r in rounds),
        "pass_at_n": fmean(r["pass_at_n"] for r in rounds),
        "generated_tokens": fmean(r["generated_tokens"] for r in rounds),
        "max_prompt_tokens": max(r["max_prompt_tokens"] for r in rounds),
        "cumulative_generated_tokens": fmean(r["cumulative_generated_tokens"] for r in rounds),
        "mean_accuracy_ci": list(bootstrap_ci(means)),
        "majority_accuracy_ci": wilson("majority_accuracy"),
        "pass_at_n_ci": wilson("pass_at_n"),
        "problem_mean_scores": means,
        "problem_majority_scores": majorities,
    }


def _arm(payloads: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """An arm's model entry from its payload per seed."""
    first = next(iter(payloads.values()))
    if len(payloads) == 1:
        # Copied, not recomputed, so a single seed's figures are exactly its rsa_results.json.
        rounds = copy.deepcopy(first["rounds"])
    else:
        num_problems = first["num_problems"]
        rounds = [_pool_round(per_seed, num_problems) for per_seed in zip(*(p["rounds"] for p in payloads.values()))]
    return {"num_problems": first["num_problems"], "seeds": sorted(payloads), "rounds": rounds}


def _best_rsa_round(rounds: Sequence[dict[str, Any]]) -> int:
    """The aggregation round (t >= 1) with the highest mean accuracy, the earliest on a tie; 0 without one."""
    return max(rounds[1:], key=lambda r: r["mean_accuracy"], default=rounds[0])["round"]


def _paired_figures(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def scores(model: str, t: int, key: str = "problem_mean_scores") -> list[float]:
        return models[model]["rounds"][t][key]

    paired: dict[str, Any] = {"within": {
        name: [{"round": t, **_paired(scores(name, t), scores(name, 0))} for t in range(1, len(entry["rounds"]))]
        for name, entry in models.items()
    }}
    if "codesign_rl" not in models:
        return paired
    codesign = models["codesign_rl"]["rounds"]
    best = _best_rsa_round(codesign)
    if len(codesign) > 1:
        paired["codesign_round1_minus_round0"] = _judged(scores("codesign_rl", 1), scores("codesign_rl", 0))
    majority = {"vs_own_round0_majority": _judged(scores("codesign_rl", best),
                                                  scores("codesign_rl", 0, "problem_majority_scores"))}
    if "plain_rl" in models:
        shared_rounds = range(min(len(codesign), len(models["plain_rl"]["rounds"])))
        paired["codesign_minus_plain"] = [
            {"round": t, **_paired(scores("codesign_rl", t), scores("plain_rl", t))} for t in shared_rounds
        ]
        paired["primary"] = {"codesign_round": best, **_judged(scores("codesign_rl", best), scores("plain_rl", 0))}
        majority = {"vs_plain_round0_majority": _judged(scores("codesign_rl", best),
                                                        scores("plain_rl", 0, "problem_majority_scores")),
                    **majority}
    paired["majority"] = majority
    return paired


def _mean_compute(entries: Sequence[dict[str, int]]) -> dict[str, int]:
    """Each part's mean over seeds, rounded; the total is their sum, so that the table adds up (rounding each
    mean alone can leave the total one token off the sum of the parts)."""
    parts = {key: round(fmean(entry[key] for entry in entries)) for key in COMPUTE_KEYS if key != "total"}
    return {**parts, "total": sum(parts.values())}


def _summary(models: dict[str, dict[str, Any]], compute: dict[str, dict[str, int]], split: str) -> dict[str, Any]:
    summary = {"models": models, "paired": _paired_figures(models), "compute": compute}
    primary = summary["paired"].get("primary")
    return {**summary, "verdict": verdict_text(summary, split), "outcome": primary["outcome"] if primary else None}


def build_results(shared: dict[str, dict], per_seed: dict[int, dict[str, dict]],
                  compute: dict[int, dict[str, dict[str, int]]], extra: dict | None = None, split: str = "test") -> dict:
    """The JSON-serialisable results: models (arms pooled over seeds), paired differences, compute, verdict;
    per-seed figures under `seeds` when there are several RL seeds. `extra` is carried verbatim as `run`; `split`
    names the evaluated problems (test: the held-out set, validation)."""
    shared_models = {
        name: {"num_problems": shared[name]["num_problems"], "rounds": copy.deepcopy(shared[name]["rounds"])}
        for name in MODELS if name in shared
    }
    arm_payloads = {arm: {seed: arms[arm] for seed, arms in per_seed.items() if arm in arms} for arm in ARMS}
    pooled_models = {**shared_models, **{arm: _arm(p) for arm, p in arm_payloads.items() if p}}
    pooled_compute = {
        arm: _mean_compute(entries)
        for arm in ARMS
        if (entries := [arms[arm] for arms in compute.values() if arm in arms])
    }
    payloads = [*shared.values(), *(p for arms in per_seed.values() for p in arms.values())]
    first = payloads[0] if payloads else {}
    results = {
        **_summary(pooled_models, pooled_compute, split),
        "eval": {"config": first.get("config"), "num_problems": first.get("num_problems"), "split": split},
        "run": extra or {},
    }
    if len(per_seed) > 1:
        results["seeds"] = {
            str(seed): _summary({**shared_models, **{arm: _arm({seed: arms[arm]}) for arm in ARMS if arm in arms}},
                                {arm: _mean_compute([values]) for arm, values in compute.get(seed, {}).items()}, split)
            for seed, arms in sorted(per_seed.items())
        }
    return results


def _points(diff: float) -> str:
    return f"{100 * diff:+.1f}"


def _ci_points(ci: Sequence[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _difference(entry: dict[str, Any]) -> str:
    return f"{_points(entry['diff'])} points [95% CI {100 * entry['ci'][0]:.1f}, {100 * entry['ci'][1]:.1f}]"


def verdict_text(results: dict, split: str = "test") -> str:
    """A plain-language paragraph, from `results["models"]` and `results["paired"]` alone."""
    paired, models = results["paired"], results["models"]
    primary = paired.get("primary")
    if primary is None:
        return ("No verdict: comparing co-design with plain RL needs both RL arms (plain_rl and codesign_rl); "
                f"this run has: {', '.join(models) or 'no evaluated model'}.")
    codesign = models["codesign_rl"]
    best, rsa_rounds = primary["codesign_round"], len(codesign["rounds"]) - 1
    best_mean = codesign["rounds"][best]["mean_accuracy"]
    plain_mean = models["plain_rl"]["rounds"][0]["mean_accuracy"]
    seeds = len(codesign["seeds"])
    headline, conclusion = _PRIMARY[primary["outcome"]]
    subject = (f"the co-design arm's best RSA round (round {best}, {best_mean:.3f} mean accuracy)" if best
               else f"the co-design arm's round 0 ({best_mean:.3f} mean accuracy; no RSA rounds were run)")
    pooled = f", pooled over {seeds} RL seeds" if seeds > 1 else ""
    sentences = [(
        f"{headline}: {subject} minus the plain arm's round 0 ({plain_mean:.3f}) is {_difference(primary)} over "
        f"{codesign['num_problems']} {SPLIT_NAMES[split]} problems{pooled}: {conclusion}."
    )]
    if rsa_rounds > 1:
        sentences.append(f"Round {best} was picked as the best of rounds 1-{rsa_rounds} on these same problems, "
                         "a selection effect that favours co-design.")
    if "codesign_round1_minus_round0" in paired:
        entry = paired["codesign_round1_minus_round0"]
        sentences.append(f"Co-design round 1 minus its own round 0: {_difference(entry)}, "
                         f"{_OUTCOME_PHRASES[entry['outcome']]}.")
    per_round = ", ".join(f"round {e['round']}: {_points(e['diff'])} {_ci_points(e['ci'])}"
                          for e in paired["codesign_minus_plain"])
    sentences.append(f"Co-design minus plain RL per round (points, 95% CI): {per_round}.")
    vs_plain, vs_own = paired["majority"]["vs_plain_round0_majority"], paired["majority"]["vs_own_round0_majority"]
    sentences.append(
        f"Against majority@N, co-design's best round minus plain RL's round-0 majority@N is {_difference(vs_plain)}, "
        f"{_OUTCOME_PHRASES[vs_plain['outcome']]}; minus its own round-0 majority@N it is {_difference(vs_own)}, "
        f"{_OUTCOME_PHRASES[vs_own['outcome']]}."
    )
    return " ".join(sentences)


def _write_atomic(path: Path, text: str) -> Path:
    # Readers (a dashboard, a sweep collecting results) must never see a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _tokens(count: float) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}k"
    return f"{count:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'|'.join('---' for _ in header)}|",
            *(f"| {' | '.join(row)} |" for row in rows), ""]


def _accuracy(value: float, ci: Sequence[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _model_section(name: str, entry: dict[str, Any], level: str = "###") -> list[str]:
    seeds = entry.get("seeds", [])
    pooled = f", pooled over RL seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    rows = [
        [str(r["round"]), _accuracy(r["mean_accuracy"], r["mean_accuracy_ci"]),
         _accuracy(r["majority_accuracy"], r["majority_accuracy_ci"]), _accuracy(r["pass_at_n"], r["pass_at_n_ci"]),
         f"{r['generated_tokens']:.0f}", f"{r['cumulative_generated_tokens']:.0f}"]
        for r in entry["rounds"]
    ]
    header = ["round", "mean accuracy [95% CI]", "majority@N [95% CI]", "pass@N [95% CI]",
              "generated tokens/problem", "cumulative"]
    return [f"{level} {LABELS[name]} ({entry['num_problems']} problems{pooled})", "", *_table(header, rows)]


def _comparison_rows(paired: dict[str, Any]) -> list[list[str]]:
    primary = paired.get("primary")
    majority = paired.get("majority", {})
    best = f"co-design round {primary['codesign_round']}" if primary else "co-design best round"
    labelled = [
        (f"{best} − plain RL round 0 (primary)", primary),
        ("co-design round 1 − co-design round 0", paired.get("codesign_round1_minus_round0")),
        (f"{best} mean − plain RL round-0 majority@N", majority.get("vs_plain_round0_majority")),
        (f"{best} mean − co-design round-0 majority@N", majority.get("vs_own_round0_majority")),
    ]
    return [[label, _points(e["diff"]), _ci_points(e["ci"]), e["outcome"]] for label, e in labelled if e]


def _paired_section(paired: dict[str, Any]) -> list[str]:
    lines = ["## Paired differences (points of mean accuracy)", ""]
    comparisons = _comparison_rows(paired)
    if comparisons:
        lines += ["### Key comparisons", "", *_table(["comparison", "difference", "95% CI", "outcome"], comparisons)]
    if "codesign_minus_plain" in paired:
        rows = [[str(e["round"]), _points(e["diff"]), _ci_points(e["ci"]), outcome(e["ci"])]
                for e in paired["codesign_minus_plain"]]
        lines += ["### Co-design RL − plain RL, round by round", "",
                  *_table(["round", "difference", "95% CI", "outcome"], rows)]
    within = [[LABELS[name], str(e["round"]), _points(e["diff"]), _ci_points(e["ci"])]
              for name, entries in paired["within"].items() for e in entries]
    if within:
        lines += ["### Each model's round t − its own round 0", "",
                  *_table(["model", "round", "difference", "95% CI"], within)]
    return lines


def _compute_section(compute: dict[str, dict[str, int]], seeds: int) -> list[str]:
    rows = [[LABELS[arm], *(_tokens(values[key]) for key in COMPUTE_KEYS)] for arm, values in compute.items()]
    per_seed = f" (mean over {seeds} RL seeds)" if seeds > 1 else ""
    lines = [f"## RL compute{per_seed}", "", *_table(["arm", "prefill", "decode", "trained", "total"], rows)]
    if set(ARMS) <= set(compute):
        plain, codesign = compute["plain_rl"]["total"], compute["codesign_rl"]["total"]
        apart = abs(codesign - plain) / max(plain, codesign, 1)
        sentence = (f"Both arms stop at the same compute budget (rl.max_compute_tokens): their totals are "
                    f"{_tokens(plain)} (plain RL) and {_tokens(codesign)} (co-design RL), {100 * apart:.1f}% apart.")
        lines += [sentence, ""]
    return lines


def _value(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _run_section(run: dict[str, Any]) -> list[str]:
    lines = ["## Run", ""]
    for key, value in run.items():
        if key == "export" and isinstance(value, dict) and {"path", "generated_text"} <= set(value):
            lines.append(f"- The co-design model was exported to `{value['path']}` in Hugging Face format, loaded "
                         f"with transformers.AutoModelForCausalLM and generated: `{value['generated_text']}`")
        elif key == "base_pretraining" and isinstance(value, dict):
            accuracies = ", ".join(f"{k.replace('_', ' ')} {_value(v)}" for k, v in value.items())
            lines.append(f"- Base model after pretraining: {accuracies}")
        elif key == "stage_commands" and isinstance(value, dict):
            lines.append("- Each stage alone:")
            lines += [f"  - {stage}: `{command}`" for stage, command in value.items()]
        elif "wall" in key and isinstance(value, dict):
            stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in value.items())
            lines.append(f"- Wall time per stage: {stages}")
        elif isinstance(value, dict):
            lines.append(f"- {key}: {', '.join(f'{k}={_value(v)}' for k, v in value.items())}")
        else:
            lines.append(f"- {key}: {_value(value)}")
    return [*lines, ""]


def _how_to_read(config: dict[str, Any] | None) -> list[str]:
    shape = f" (here N={config['n']}, C={config['c']}, T={config['t']})" if config else ""
    text = (
        f"Each model is evaluated with Markovian RSA{shape}. Round 0 samples N independent candidates per problem; "
        "round t rewrites each candidate from C random tails of round t-1's candidates. Mean accuracy is the "
        "average candidate's score; majority@N scores the majority vote over the round's N answers; pass@N "
        "counts a problem solved when any candidate is right. Intervals are 95%: a bootstrap over problems for "
        "mean accuracy, Wilson intervals for majority@N and pass@N. Differences are paired: both sides are "
        "measured on the same problems, which are resampled together. Differences are in points (0.044 = 4.4 "
        "points); an interval that excludes 0 is a gain or a loss, otherwise no detectable difference."
    )
    return ["## How to read this", "", text, ""]


def write_report(results: dict, run_dir: Path, plot_name: str = "rsa_scaling.png") -> Path:
    """`run_dir/report.md`, from `results` alone so it can be rebuilt from results.json."""
    outcome_line = f"**Outcome: {results['outcome']}.**" if results["outcome"] else "**Outcome: none.**"
    lines = ["# Co-design RL vs plain RL under Markovian RSA", "", f"{outcome_line} {results['verdict']}", "",
             *_how_to_read(results["eval"].get("config")), "## Accuracy per round", ""]
    for name, entry in results["models"].items():
        lines += _model_section(name, entry)
    lines += [f"![Accuracy against generated tokens per problem]({plot_name})", "", *_paired_section(results["paired"])]
    if results["compute"]:
        lines += _compute_section(results["compute"], len(results.get("seeds", {})))
    for seed, summary in results.get("seeds", {}).items():
        lines += [f"## RL seed {seed}", "", f"**Outcome: {summary['outcome']}.** {summary['verdict']}", ""]
        for arm in ARMS:
            if arm in summary["models"]:
                lines += _model_section(arm, summary["models"][arm], level="####")
    if results["run"]:
        lines += _run_section(results["run"])
    return _write_atomic(Path(run_dir) / "report.md", "\n".join(lines))


def plot_scaling(results: dict, out: Path) -> Path:
    """Mean accuracy (95% CI bars; dashed: majority@N) against cumulative generated tokens per problem, and the
    same against the round: a model that cannot aggregate spends many more tokens per round, which squeezes the
    others together on the token axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_round) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, entry in results["models"].items():
        rounds = entry["rounds"]
        mean = np.array([r["mean_accuracy"] for r in rounds])
        ci = np.array([r["mean_accuracy_ci"] for r in rounds])
        majority = [r["majority_accuracy"] for r in rounds]
        for ax, xs in ((by_tokens, [r["cumulative_generated_tokens"] for r in rounds]),
                       (by_round, [r["round"] for r in rounds])):
            line = ax.errorbar(xs, mean, yerr=[mean - ci[:, 0], ci[:, 1] - mean], marker="o", capsize=3,
                               label=LABELS[name])
            ax.plot(xs, majority, linestyle="--", color=line.lines[0].get_color(), alpha=0.4)
        for r, x, y in zip(rounds, [r["cumulative_generated_tokens"] for r in rounds], mean):
            by_tokens.annotate(f"t={r['round']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    by_tokens.set_xlabel("generated tokens per problem (cumulative)")
    by_tokens.set_title("Markovian RSA: accuracy against compute")
    by_round.set_xlabel("RSA round t")
    by_round.set_title("the same, by round")
    by_round.xaxis.get_major_locator().set_params(integer=True)
    for ax in (by_tokens, by_round):
        ax.set_ylabel("accuracy (solid: mean, dashed: majority@N)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_outputs(results: dict, run_dir: Path) -> dict[str, Path]:
    """results.json, rsa_scaling.png and report.md under `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return {
        "results": _write_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n"),
        "plot": plot_scaling(results, run_dir / "rsa_scaling.png"),
        "report": write_report(results, run_dir),
    }
