"""One RL step's rollouts: plain samples, then online Markovian RSA rounds built from them, scored and grouped.

    collector = RolloutCollector(engine, tokenizer, prompt_source("nano_chain_sum", 0), rl_cfg, rsa_cfg, seed=0)
    rollouts = collector.collect(step=12)
    for group in rollouts.groups: group.kind, group.rewards, group.kept, group.trajectories

Per step and rank: P problems (rl.prompts_per_step / world size), G plain samples each. Those G samples are the
problem's round-0 population. For the first k_1 problems (`CodesignConfig.problems_per_round` of the whole step,
dealt out over the ranks) round 1 builds G
aggregation prompts from that population with `zaya_train.rsa.population_prompts`, the function evaluation uses
(same template, tail cut and subset choice), each prompt from its own random C-subset, and samples one output
per prompt; those G outputs are the round-1 population, from which round 2 is built for the first k_2 of them, and
so on. A group is one problem's G outputs in one round. With `source=expert` the round-1 populations come from
the candidates of `expert_file` rows instead (their own problems); `mixed` takes half of round 1's problems from
each.

Dynamic sampling marks groups whose task rewards are all 0 or all 1 as dropped (they stay in the population the
next round aggregates), and refills dropped plain groups with fresh problems up to `rl.max_refills` times.
Degenerate (LZ77-compressible) rollouts get the lowest reward first (0, or a reward model's `fail_reward`).

Problem indices and sampling seeds are functions of (seed, step, rank) alone, so a resumed run draws the same
problems and samples as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from zaya_train.rl.algorithms import degenerate_mask, dynamic_sampling_filter
from zaya_train.rl.config import RLConfig
from zaya_train.rl.environments import environment_of, floor_reward, score_completions
from zaya_train.rl.prompts import PromptSource, qa_rows, read_jsonl
from zaya_train.rsa import RSAConfig, RSAProblem, Trajectory, build_template, population_prompts
from zaya_train.rsa.core import stable_hash64


def step_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of `parts` (seed, step, rank, what it seeds)."""
    return stable_hash64(*parts) >> 1


def kind_name(round_idx: int) -> str:
    return "plain" if round_idx == 0 else f"round{round_idx}"


@dataclass(eq=False)
class Group:
    """One problem's G outputs in one round: the unit of the advantage baseline."""

    kind: str
    problem: RSAProblem
    trajectories: list[Trajectory]
    kept: bool = True
    environment: str = "main"
    outcomes: list[str | None] = field(default_factory=list)
    """Per trajectory, what the verifier reported beside the reward (a sandbox outcome), when it does."""

    @property
    def rewards(self) -> list[float]:
        return [float(t.reward) for t in self.trajectories]


@dataclass
class StepRollouts:
    groups: list[Group]
    prefill_tokens: int = 0
    decode_tokens: int = 0
    degenerate: int = 0
    skipped_prompts: int = 0
    reward_s: float = 0.0
    generated: Counter = field(default_factory=Counter)
    """Sequences per kind."""

    @property
    def trained(self) -> list[Group]:
        return [g for g in self.groups if g.kept]


class RolloutCollector:
    def __init__(self, engine, tokenizer, source: PromptSource, rl: RLConfig, rsa: RSAConfig, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if rl.prompts_per_step % world_size:
            raise ValueError(f"rl.prompts_per_step: {rl.prompts_per_step} is not a multiple of the {world_size} ranks")
        if rl.codesign.share > 0 and rsa.c > rl.group_size:
            raise ValueError(f"rsa.c: {rsa.c} tails per aggregation prompt need a population of at least that many, "
                             f"but rl.group_size is {rl.group_size}")
        self.engine, self.tokenizer, self.source, self.rl = engine, tokenizer, source, rl
        self.rsa = rsa.stripping([tokenizer.eos_token_id])
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.local_problems = rl.prompts_per_step // world_size
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.template = build_template(rsa.template, self.encode, max_candidates=rsa.c)
        # Global counts, dealt out over the ranks (the first ranks take the remainders), so the mix does not depend
        # on the world size.
        self.round_counts = [count // world_size + (rank < count % world_size)
                             for count in rl.codesign.problems_per_round(rl.prompts_per_step)]
        self.expert_rows = None
        if rl.codesign.expert_file is not None and rl.codesign.source != "self":
            rows = read_jsonl(rl.codesign.expert_file)
            pairs = qa_rows(rows, rl.codesign.expert_file)
            self.expert_rows = []
            for i, (row, (question, answer)) in enumerate(zip(rows, pairs)):
                candidates = row.get("candidates")
                if not isinstance(candidates, list) or len(candidates) < rsa.c:
                    raise ValueError(f"{rl.codesign.expert_file}: row {i} needs a 'candidates' list of at least "
                                     f"rsa.c={rsa.c} texts")
                self.expert_rows.append((question, answer, [self.encode(str(c)) for c in candidates]))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _problem(self, index: int) -> RSAProblem:
        question, reference = self.source[index]
        question_ids = self.encode(question)
        return RSAProblem(problem_id=index, prompt_ids=self.bos + question_ids, question_ids=question_ids,
                          reference=reference)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, seed: int, out: StepRollouts):
        out.prefill_tokens += sum(len(p) for p in prompts)
        results = self.engine.generate(
            prompts, max_new_tokens=max_new_tokens, temperature=self.rl.temperature, top_p=self.rl.top_p, seed=seed,
            max_batch_size=self.rl.max_batch_size or len(prompts),
        )
        out.decode_tokens += sum(len(r.token_ids) for r in results)
        return results

    def _score(self, groups: list[Group], out: StepRollouts) -> None:
        start = time.perf_counter()
        pairs = [(g, t) for g in groups for t in g.trajectories]
        degenerate = degenerate_mask([t.token_ids for _, t in pairs]).tolist() if self.rl.canary else [False] * len(pairs)
        scored_at = [i for i, d in enumerate(degenerate) if not d]
        # One call for the whole round: code runs in a pool of sandboxes, reward models score in batches.
        scored = dict(zip(scored_at, score_completions(
            self.source.verifier, [self.decode(pairs[i][1].token_ids) for i in scored_at],
            [pairs[i][0].problem.reference for i in scored_at])))
        for group in groups:
            group.outcomes = []
        for i, (group, t) in enumerate(pairs):
            if degenerate[i]:
                t.reward = floor_reward(self.source.verifier, group.problem.reference)
                out.degenerate += 1
                group.outcomes.append("degenerate")
            else:
                t.reward = float(scored[i].reward)
                group.outcomes.append(scored[i].outcome)
        if self.rl.dynamic_sampling and groups:
            kept = dynamic_sampling_filter(torch.tensor([g.rewards for g in groups])).keep_N.tolist()
            for group, keep in zip(groups, kept):
                group.kept = keep
        out.reward_s += time.perf_counter() - start

    def _plain_groups(self, problems: list[RSAProblem], seed: int, out: StepRollouts) -> list[Group]:
        g = self.rl.group_size
        prompts = [p.prompt_ids for p in problems for _ in range(g)]
        if not prompts:
            return []
        results = self._generate(prompts, self.rl.max_new_tokens, seed, out)
        groups = [
            Group("plain", p, [Trajectory.from_rollout(p.problem_id, 0, p.prompt_ids, r)
                               for r in results[i * g:(i + 1) * g]], environment=environment_of(self.source, p.problem_id))
            for i, p in enumerate(problems)
        ]
        out.generated["plain"] += len(prompts)
        self._score(groups, out)
        return groups

    def _fresh_problems(self, step: int, attempt: int, count: int, out: StepRollouts) -> list[RSAProblem]:
        stride = self.rl.prompts_per_step * (1 + self.rl.max_refills)
        base = step * stride + self.rank * self.local_problems * (1 + self.rl.max_refills) + attempt * self.local_problems
        problems = []
        for j in range(count):
            problem = self._problem(base + j)
            if len(problem.prompt_ids) > self.rl.max_prompt_tokens:
                out.skipped_prompts += 1
                continue
            problems.append(problem)
        return problems

    def _expert_populations(self, step: int, count: int) -> list[tuple[RSAProblem, list[list[int]]]]:
        rows = self.expert_rows
        total = len(rows)
        out = []
        for j in range(count):
            index = (step * self.world_size * count + self.rank * count + j) % total
            question, answer, candidates = rows[index]
            question_ids = self.encode(question)
            problem = RSAProblem(problem_id=f"expert-{index}", prompt_ids=self.bos + question_ids,
                                 question_ids=question_ids, reference=answer)
            out.append((problem, candidates))
        return out

    def collect(self, step: int) -> StepRollouts:
        out = StepRollouts(groups=[])
        plain = self._plain_groups(self._fresh_problems(step, 0, self.local_problems, out),
                                   step_seed(self.seed, step, self.rank, "plain", 0), out)
        out.groups += plain
        for attempt in range(1, self.rl.max_refills + 1):
            missing = self.local_problems - sum(g.kept for g in out.groups)
            if missing <= 0:
                break
            refill = self._fresh_problems(step, attempt, missing, out)
            out.groups += self._plain_groups(refill, step_seed(self.seed, step, self.rank, "plain", attempt), out)
        if not self.round_counts:
            return out

        # Round-1 populations: this step's own plain samples, expert candidates, or half each.
        k1 = self.round_counts[0]
        num_expert = {"self": 0, "expert": k1, "mixed": k1 // 2}[self.rl.codesign.source]
        populations = [(g.problem, [t.token_ids for t in g.trajectories], g.environment)
                       for g in plain[: k1 - num_expert]]
        populations += [(problem, candidates, "expert")
                        for problem, candidates in (self._expert_populations(step, num_expert) if num_expert else [])]
        for round_idx, count in enumerate(self.round_counts, start=1):
            populations = populations[:count]
            if not populations:
                break
            seed = step_seed(self.seed, step, self.rank, "round", round_idx)
            built = [
                population_prompts(problem, population, round_idx, self.rl.group_size, self.rsa, self.template,
                                   seed=seed, bos_ids=self.bos)
                for problem, population, _ in populations
            ]
            prompts = [p.prompt_ids for per_problem in built for p in per_problem]
            results = self._generate(prompts, self.rl.codesign.max_new_tokens, seed, out)
            g = self.rl.group_size
            groups = [
                Group(kind_name(round_idx), problem, [
                    Trajectory.from_rollout(problem.problem_id, round_idx, p.prompt_ids, r, p.parents)
                    for p, r in zip(per_problem, results[i * g:(i + 1) * g])
                ], environment=environment)
                for i, ((problem, _, environment), per_problem) in enumerate(zip(populations, built))
            ]
            out.generated[kind_name(round_idx)] += len(prompts)
            self._score(groups, out)
            out.groups += groups
            populations = [(grp.problem, [t.token_ids for t in grp.trajectories], grp.environment) for grp in groups]
        return out


def rollout_totals(rollouts: StepRollouts, kinds: list[str]) -> dict[str, float]:
    """Additive per-step counts (sums over ranks stay meaningful); `rollout_metrics` turns them into metrics."""
    totals: dict[str, float] = {}
    for kind in kinds:
        groups = [g for g in rollouts.groups if g.kind == kind]
        totals[f"reward_sum/{kind}"] = sum(r for g in groups for r in g.rewards)
        totals[f"length_sum/{kind}"] = sum(len(t.token_ids) for g in groups for t in g.trajectories)
        totals[f"count/{kind}"] = sum(len(g.trajectories) for g in groups)
        totals[f"samples/generated/{kind}"] = rollouts.generated[kind]
        totals[f"samples/trained/{kind}"] = sum(len(g.trajectories) for g in groups if g.kept)
    for group in rollouts.groups:
        env = group.environment
        for key, value in ((f"env_reward_sum/{env}", sum(group.rewards)), (f"env_count/{env}", len(group.rewards))):
            totals[key] = totals.get(key, 0.0) + value
        for outcome in group.outcomes:
            if outcome is not None:
                totals[f"outcomes/{env}/{outcome}"] = totals.get(f"outcomes/{env}/{outcome}", 0.0) + 1
    plain = [g for g in rollouts.groups if g.kind == "plain"]
    totals["solved_groups"] = sum(max(g.rewards) > 0 for g in plain)
    totals["plain_groups"] = len(plain)
    totals["samples/degenerate"] = rollouts.degenerate
    totals["prompts/skipped_too_long"] = rollouts.skipped_prompts
    return totals


def rollout_metrics(totals: dict[str, float], kinds: list[str]) -> dict[str, float]:
    """Mean task reward and response length per prompt type, the fraction of plain problems with a correct
    sample, and sample counts that reconcile: generated = dropped + trained, in total and per type."""
    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    metrics: dict[str, float] = {}
    for kind in kinds:
        generated, trained = totals[f"samples/generated/{kind}"], totals[f"samples/trained/{kind}"]
        metrics[f"reward/{kind}"] = ratio(totals[f"reward_sum/{kind}"], totals[f"count/{kind}"])
        metrics[f"response_len/{kind}"] = ratio(totals[f"length_sum/{kind}"], totals[f"count/{kind}"])
        metrics[f"samples/generated/{kind}"] = int(generated)
        metrics[f"samples/trained/{kind}"] = int(trained)
        metrics[f"samples/dropped/{kind}"] = int(generated - trained)
    for name in ("generated", "trained", "dropped"):
        metrics[f"samples/{name}"] = sum(metrics[f"samples/{name}/{kind}"] for kind in kinds)
    for key, value in totals.items():
        if key.startswith("env_reward_sum/"):
            env = key.removeprefix("env_reward_sum/")
            metrics[f"reward/env/{env}"] = ratio(value, totals[f"env_count/{env}"])
        elif key.startswith("outcomes/"):
            metrics[key] = int(value)
    metrics["solve_rate"] = ratio(totals["solved_groups"], totals["plain_groups"])
    metrics["samples/degenerate"] = int(totals["samples/degenerate"])
    metrics["prompts/skipped_too_long"] = int(totals["prompts/skipped_too_long"])
    return metrics
