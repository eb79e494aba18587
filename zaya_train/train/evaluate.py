"""End-of-run evaluation of the nano recipe: accuracy on the chain-sum task's held-out problems.

Greedy accuracy, and the mean accuracy of temperature-1 samples (the Markovian RSA paper's population metric),
decoded by the rollout engine on the model's own cache.
"""

from __future__ import annotations

import torch

from zaya_train.data import ChainSumConfig, held_out_problems, is_correct
from zaya_train.model import ZayaForCausalLM
from zaya_train.rollout import RolloutEngine


@torch.no_grad()
def evaluate_chain_sum(
    model: ZayaForCausalLM, tokenizer, num_problems: int, samples_per_problem: int = 4, seed: int = 0
) -> dict[str, float]:
    problems = held_out_problems(ChainSumConfig())[:num_problems]
    prompts = [[tokenizer.bos_token_id, *tokenizer(p.prompt, add_special_tokens=False)["input_ids"]] for p in problems]
    budget = max(len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]) for p in problems) + 8
    was_training = model.training
    model.eval()
    engine = RolloutEngine(model)
    greedy = engine.generate(prompts, max_new_tokens=budget, temperature=0.0)
    sampled = engine.generate(
        [p for p in prompts for _ in range(samples_per_problem)], max_new_tokens=budget, temperature=1.0, seed=seed
    )
    model.train(was_training)

    def correct(problem, result) -> bool:
        return is_correct(problem, tokenizer.decode(result.token_ids, skip_special_tokens=True))

    greedy_acc = sum(correct(p, r) for p, r in zip(problems, greedy)) / len(problems)
    sampled_acc = sum(
        correct(problems[i // samples_per_problem], r) for i, r in enumerate(sampled)
    ) / len(sampled)
    return {"eval/greedy_accuracy": greedy_acc, "eval/sampled_accuracy": sampled_acc, "eval/problems": len(problems)}
