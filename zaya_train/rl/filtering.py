"""Drop the problems a stage's starting policy already solves (`rl.filter.*`), before its first RL step.

    zaya-train recipe=rl model.init_from=runs/stage1 rl.filter.pass_rate=0.75 rl.filter.samples=8 rl.filter.pool=4096

ZAYA1 re-filters each stage's data with the policy the stage starts from (arXiv 2605.05365, section IV): a problem
solved in `pass_rate` of its samples or more teaches nothing but costs rollouts. The pass examines the source's
first `rl.filter.pool` problems (all of a smaller jsonl), `rl.filter.samples` samples each, split over the ranks,
and the stage then cycles over the kept ones. The kept indices and counts go to run_dir/filtered_prompts.json, which
a resumed run reads instead of filtering again (its policy is no longer the starting one).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from zaya_train.rl.environments import score_completions
from zaya_train.rl.rollouts import RolloutCollector, StepRollouts, step_seed

log = logging.getLogger("zaya_train")

FILTER_FILE = "filtered_prompts.json"


def pool_size(source, pool: int) -> int:
    rows = getattr(source, "rows", None)
    return min(pool, len(rows)) if rows is not None and source.shuffle_rows else pool


def _pass_rates(collector: RolloutCollector, indices: list[int], samples: int, max_new_tokens: int,
                seed: int) -> list[float]:
    problems = [collector._problem(i) for i in indices]
    prompts = [p.prompt_ids for p in problems for _ in range(samples)]
    if not prompts:
        return []
    results = collector._generate(prompts, max_new_tokens, seed, StepRollouts(groups=[]))
    texts = [collector.decode(r.token_ids) for r in results]
    references = [p.reference for p in problems for _ in range(samples)]
    rewards = [s.reward for s in score_completions(collector.source.verifier, texts, references)]
    return [sum(rewards[k * samples:(k + 1) * samples]) / samples for k in range(len(problems))]


def filter_solved(collector: RolloutCollector, rl, seed: int, run_dir: Path, rank: int,
                  world_size: int) -> dict[str, Any]:
    """The kept problem indices and counts: `{"kept": [...], "examined": n, "dropped": n, "pass_rate": p}`, from
    run_dir/filtered_prompts.json when an earlier start of this run wrote it."""
    path = run_dir / FILTER_FILE
    if path.is_file():
        return json.loads(path.read_text())
    cfg = rl.filter
    total = pool_size(collector.source, cfg.pool)
    mine = list(range(rank, total, world_size))
    rates = _pass_rates(collector, mine, cfg.samples, cfg.max_new_tokens or rl.max_new_tokens,
                        step_seed(seed, "filter", rank))
    pairs = list(zip(mine, rates))
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    kept = sorted(i for i, rate in pairs if rate < cfg.pass_rate)
    result = {"kept": kept, "examined": total, "dropped": total - len(kept), "pass_rate": cfg.pass_rate,
              "samples": cfg.samples}
    if rank == 0:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result) + "\n")
        os.replace(tmp, path)
    log.info("filter: %d of %d problems solved at pass rate >= %.2f by the starting policy (%d samples each) were "
             "dropped; %d kept", result["dropped"], total, cfg.pass_rate, cfg.samples, len(kept))
    return result
