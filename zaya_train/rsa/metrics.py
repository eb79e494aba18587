"""Per-round RSA metrics and the `rsa_results.json` writer.

    from zaya_train.rsa import round_metrics, write_results
    metrics = round_metrics(1, population)          # population[problem][candidate] -> Candidate
    write_results(result, "runs/eval1")             # -> runs/eval1/rsa_results.json

All metrics are averages over problems of a per-problem value:
- mean_accuracy: mean score of the N candidates (the paper's headline number);
- majority_accuracy: score of the most common extracted answer (candidates without an answer do not vote;
  on a tie, the mean over the tied answers, i.e. the expected score of a uniform tie-break; 0 when nobody
  answered);
- pass_at_n: best score among the N candidates (1 if any is right, for 0/1 rewards);
- generated_tokens: newly generated tokens of all N candidates (prompts and copied tails excluded);
- max_prompt_tokens: the longest prompt built in the round, over all problems (a maximum, not a mean);
- mean_accuracy_ci: a 95% percentile bootstrap interval over problems; majority_accuracy_ci and pass_at_n_ci:
  95% Wilson intervals (zaya_train.rsa.stats);
- problem_mean_scores / problem_majority_scores: each problem's mean candidate score / majority-vote score, in
  problem order, for paired comparisons between rounds or models evaluated on the same problems
  (`paired_bootstrap_ci`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zaya_train.rsa.stats import bootstrap_ci, wilson_ci

if TYPE_CHECKING:
    from zaya_train.rsa.core import Candidate, RSAResult

RESULTS_FILE = "rsa_results.json"


@dataclass(frozen=True)
class RoundMetrics:
    round: int
    mean_accuracy: float
    majority_accuracy: float
    pass_at_n: float
    generated_tokens: float
    max_prompt_tokens: int
    cumulative_generated_tokens: float
    """generated_tokens summed over this round and all earlier ones: the cost of stopping here."""
    mean_accuracy_ci: list[float]
    majority_accuracy_ci: list[float]
    pass_at_n_ci: list[float]
    problem_mean_scores: list[float]
    problem_majority_scores: list[float]


def majority_score(candidates: Sequence[Candidate]) -> float:
    votes = Counter(c.answer for c in candidates if c.answer is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [answer for answer, count in votes.items() if count == top]
    per_answer = [
        sum(c.score for c in candidates if c.answer == answer) / votes[answer] for answer in winners
    ]
    return sum(per_answer) / len(per_answer)


def round_metrics(
    round_idx: int,
    population: Sequence[Sequence[Candidate]],
    previous: RoundMetrics | None = None,
) -> RoundMetrics:
    """Metrics of one round; `previous` (the prior round's metrics) carries the cumulative token count."""
    if not population or any(not cands for cands in population):
        raise ValueError("population must hold at least one problem with at least one candidate")
    num_problems = len(population)
    generated = sum(len(c.token_ids) for cands in population for c in cands) / num_problems
    means = [sum(c.score for c in cands) / len(cands) for cands in population]
    majorities = [majority_score(cands) for cands in population]
    majority = sum(majorities)
    best = sum(max(c.score for c in cands) for cands in population)
    return RoundMetrics(
        round=round_idx,
        mean_accuracy=sum(means) / num_problems,
        majority_accuracy=majority / num_problems,
        pass_at_n=best / num_problems,
        generated_tokens=generated,
        max_prompt_tokens=max(c.prompt_tokens for cands in population for c in cands),
        cumulative_generated_tokens=generated + (previous.cumulative_generated_tokens if previous else 0.0),
        mean_accuracy_ci=list(bootstrap_ci(means)),
        majority_accuracy_ci=list(wilson_ci(majority, num_problems)),
        pass_at_n_ci=list(wilson_ci(best, num_problems)),
        problem_mean_scores=means,
        problem_majority_scores=majorities,
    )


def write_results(result: RSAResult, run_dir: str | os.PathLike[str]) -> Path:
    """Write `run_dir/rsa_results.json` ({"config", "num_problems", "rounds": [round 0, ...]}) atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": dataclasses.asdict(result.config),
        "num_problems": len(result.problems),
        "rounds": [dataclasses.asdict(m) for m in result.rounds],
    }
    path = run_dir / RESULTS_FILE
    # Readers (dashboards, a sweep collecting results) must never see a half-written file.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
