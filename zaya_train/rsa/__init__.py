"""Markovian RSA (recursive self-aggregation over bounded tails): one implementation for evaluation and RL.

    from zaya_train.rsa import RSAConfig, RSAProblem, TextAggregationTemplate, run_rsa, verifier_scorer
    result = run_rsa(problems, engine.generate, verifier_scorer(verifier, decode), RSAConfig(), template)
    write_results(result, run_dir)        # run_dir/rsa_results.json, one entry per round

RL builds its prompts with `population_prompts` (the function `run_rsa` uses) and records what it trains on as
`Trajectory`s; `max_aggregation_prompt_len` bounds the prompts.

See `zaya_train.rsa.core` for the algorithm. Tests: `pytest tests/rsa`.
"""

from zaya_train.rsa.config import VARIANTS, RSAConfig
from zaya_train.rsa.core import (
    AggregationPrompt,
    Candidate,
    Generate,
    GenerationResult,
    RolloutOutput,
    RSAProblem,
    RSAResult,
    Scorer,
    Trajectory,
    aggregation_prompts,
    carried_context,
    choose_parents,
    cut_tail,
    generation_seed,
    max_aggregation_prompt_len,
    population_prompts,
    run_rsa,
    split_reasoning,
    verifier_scorer,
)
from zaya_train.rsa.metrics import RESULTS_FILE, RoundMetrics, majority_score, round_metrics, write_results
from zaya_train.rsa.template import AggregationTemplate, TextAggregationTemplate, build_template

__all__ = [
    "RESULTS_FILE",
    "VARIANTS",
    "AggregationPrompt",
    "AggregationTemplate",
    "Candidate",
    "Generate",
    "GenerationResult",
    "RSAConfig",
    "RSAProblem",
    "RSAResult",
    "RolloutOutput",
    "RoundMetrics",
    "Scorer",
    "TextAggregationTemplate",
    "Trajectory",
    "aggregation_prompts",
    "build_template",
    "carried_context",
    "choose_parents",
    "cut_tail",
    "generation_seed",
    "majority_score",
    "max_aggregation_prompt_len",
    "population_prompts",
    "round_metrics",
    "run_rsa",
    "split_reasoning",
    "verifier_scorer",
    "write_results",
]
