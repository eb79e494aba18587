"""`recipe=warmstart`: the aggregation warm start before co-design RL, as a batch source of the one trainer.

    zaya-train recipe=warmstart model.init_from=runs/nano/base run_dir=runs/nano/warmstart

A model that never saw an aggregation prompt cannot use one (Markovian RSA round 1 scores near zero), so RL on
aggregation prompts would start without a single reward. ZAYA1 starts its RL from SFT on self-aggregation prompts
(the ZAYA1-8B report, arXiv 2605.05365, section VI). Here:

1. Once, the initial policy (`model.init_from`, reloaded on resume so the pool never depends on trained weights)
   samples `rsa.n` candidates for each of `rl.warmstart.pool_problems` problems of `rl.data`
   (`rl.max_new_tokens`, `rl.temperature`).
2. Every step trains `deepspeed.gradient_accumulation_steps` micro-batches of `rl.warmstart.batch_size` rows with
   the fused cross-entropy on the target tokens:
   - plain rows (1 - `aggregation_share`): a fresh problem with its worked solution when the data has one (the
     nano task), else a correct candidate of a pool problem;
   - aggregation rows: one round-1 prompt over `rsa.c` random pool candidates of a problem, built by
     `zaya_train.rsa.population_prompts` as evaluation and RL build it; for `answer_only_share` of them the
     candidates are first cut to their answer (from the last `answer_marker`), the shape of a round-2 prompt whose
     population is round-1 outputs. The target is the reference answer alone (`answer_format`) and EOS, whether or
     not the candidates agree with it.

Rows are functions of (seed, step, rank), so a resumed run trains on the same rows.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zaya_train.data import IGNORE_INDEX
from zaya_train.loading import load_model
from zaya_train.rl.loop import policy_tokenizer, real_token_loads
from zaya_train.rl.prompts import prompt_source
from zaya_train.rl.rollouts import step_seed
from zaya_train.rollout import RolloutEngine
from zaya_train.rsa import RSAProblem, build_template, population_prompts
from zaya_train.train.config import ConfigError, RunConfig
from zaya_train.train.engine import DistInfo
from zaya_train.train.trainer import MicroBatch, StepResult, StepRunner

log = logging.getLogger("zaya_train")

# Problem indices of the pool start here, far from the plain rows' indices, so the two never share a problem.
POOL_OFFSET = 1 << 40


class WarmStartSource:
    exhausted_reason = "data_exhausted"  # never: every step builds new rows

    def __init__(self, cfg: RunConfig, run_dir: Path, info: DistInfo) -> None:
        if cfg.rsa.c > cfg.rsa.n:
            raise ConfigError(f"rsa.c: {cfg.rsa.c} candidates per prompt need rsa.n >= that many, got {cfg.rsa.n}")
        self.cfg, self.ws, self.info = cfg, cfg.rl.warmstart, info
        self.tokenizer = policy_tokenizer(cfg, run_dir, info)
        self.prompts = prompt_source(cfg.rl.data, cfg.seed)
        self.bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        self.template = build_template(cfg.rsa.template, self.encode, max_candidates=cfg.rsa.c)
        self.marker = self.encode(self.ws.answer_marker)
        self.rsa = cfg.rsa.stripping([self.tokenizer.eos_token_id])
        self.stats: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def attach(self, engine, info: DistInfo) -> None:
        self.engine = engine
        self._build_pool(info)

    def _build_pool(self, info: DistInfo) -> None:
        cfg, n = self.cfg, self.cfg.rsa.n
        share = -(-self.ws.pool_problems // info.world_size)
        first = POOL_OFFSET + info.rank * share
        problems = []
        for index in range(first, first + share):
            question, reference = self.prompts[index]
            question_ids = self.encode(question)
            problems.append(RSAProblem(index, self.bos + question_ids, question_ids, reference))
        policy = load_model(cfg.model.init_from).to(info.device).eval()
        if info.rank == 0:
            log.info("warm start: sampling the candidate pool, %d problems x %d candidates", len(problems), n)
        start = time.perf_counter()
        results = RolloutEngine(policy).generate(
            [p.prompt_ids for p in problems for _ in range(n)], max_new_tokens=cfg.rl.max_new_tokens,
            temperature=cfg.rl.temperature, top_p=cfg.rl.top_p, seed=step_seed(cfg.seed, info.rank, "pool"),
            max_batch_size=cfg.rl.max_batch_size or 256,
        )
        del policy
        self.pool = []
        correct = 0
        for i, problem in enumerate(problems):
            candidates = [list(r.token_ids) for r in results[i * n:(i + 1) * n]]
            scores = [self.prompts.verifier.score(self.tokenizer.decode(c, skip_special_tokens=True),
                                                  problem.reference) for c in candidates]
            correct += sum(s == 1.0 for s in scores)
            self.pool.append((problem, candidates, [c for c, s in zip(candidates, scores) if s == 1.0]))
        self.stats = {"warmstart/pool_candidates": len(problems) * n, "warmstart/pool_correct": correct}
        if info.rank == 0:
            log.info("warm start: pool sampled in %.0f s, %d of %d candidates correct", time.perf_counter() - start,
                     correct, len(problems) * n)
        if self.prompts.solution(0) is None:
            # Plain rows then need correct pool candidates, on every rank: decide together, fail together.
            solved = torch.tensor([float(any(entry[2] for entry in self.pool))], device=info.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(solved, op=dist.ReduceOp.MIN)
            if solved.item() == 0:
                raise ConfigError("rl.data: a rank's pool holds no correct candidate, so there is no plain target; "
                                  "warm-start from a policy that solves some problems, or raise "
                                  "rl.warmstart.pool_problems")

    def _answer_only(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        ids = [t for t in ids if t != eos]
        width = len(self.marker)
        for start in range(len(ids) - width, -1, -1):
            if ids[start:start + width] == self.marker:
                return ids[start:]
        return ids

    def _rows(self, step: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids) of this step's rows on this rank."""
        ws, cfg = self.ws, self.cfg
        gas = self.engine.gradient_accumulation_steps()
        total = ws.batch_size * gas
        num_aggregation = round(total * ws.aggregation_share)
        num_answer_only = round(num_aggregation * ws.answer_only_share)
        rng = torch.Generator().manual_seed(step_seed(cfg.seed, step, self.info.rank, "warmstart"))
        rows = []
        base = (step * self.info.world_size + self.info.rank) * total
        for j in range(total - num_aggregation):
            solution = self.prompts.solution(base + j)
            if solution is not None:
                question, _ = self.prompts[base + j]
                prompt, target = self.bos + self.encode(question), self.encode(solution)
            else:
                solved = [entry for entry in self.pool if entry[2]]
                problem, _, correct = solved[int(torch.randint(len(solved), (1,), generator=rng))]
                prompt = problem.prompt_ids
                target = [t for t in correct[int(torch.randint(len(correct), (1,), generator=rng))]
                          if t != self.tokenizer.eos_token_id]
            rows.append((prompt, target + [self.tokenizer.eos_token_id]))
        for j in range(num_aggregation):
            problem, candidates, _ = self.pool[int(torch.randint(len(self.pool), (1,), generator=rng))]
            if j < num_answer_only:
                candidates = [self._answer_only(c) for c in candidates]
            seed = int(torch.randint(2**62, (1,), generator=rng))
            (built,) = population_prompts(problem, candidates, 1, 1, self.rsa, self.template, seed=seed,
                                          bos_ids=self.bos)
            target = self.encode(ws.answer_format.format(answer=problem.reference)) + [self.tokenizer.eos_token_id]
            rows.append((built.prompt_ids, target))
        return rows

    def run_step(self, step: int, runner: StepRunner) -> StepResult:
        rows = self._rows(step)
        seed = step_seed(self.cfg.seed, step, self.info.rank, "order")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = [rows[i] for i in order]
        size = self.ws.batch_size
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        update = runner.update([functools.partial(self._forward, chunk) for chunk in chunks])
        return StepResult(update.loss, update.tokens, update.skipped)

    def _forward(self, rows: list[tuple[list[int], list[int]]]) -> MicroBatch:
        width = max(len(p) + len(t) for p, t in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, (prompt, target) in enumerate(rows):
            ids[b, : len(prompt) + len(target)] = torch.tensor(prompt + target)
            labels[b, len(prompt): len(prompt) + len(target)] = torch.tensor(target)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (prompt, target) in enumerate(rows):
            real[b, : len(prompt) + len(target)] = True
        device = self.info.device
        out = self.engine(ids.to(device), labels=labels.to(device), return_logits=False, return_expert_ids=True)
        loads = real_token_loads(out.expert_ids, real.to(device), self.engine.module.config.num_router_classes)
        return MicroBatch(out.loss, out.loss.detach().float(), loads, int(real.sum()))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def finish(self, engine, step: int, loss: float, metrics, info: DistInfo) -> None:
        return None
