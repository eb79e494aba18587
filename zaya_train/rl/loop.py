"""`recipe=rl`: the RL stage as a batch source of the one trainer (zaya_train.train.trainer).

    zaya-train recipe=rl model.init_from=runs/nano/base                        # plain RL on the nano task
    zaya-train recipe=rl model.init_from=runs/nano/base rl.codesign.share=0.5 rl.codesign.rounds=2
    zaya-train recipe=rl rl=zaya1 model=zaya1_8b model.init_from=exports/zaya1-sft rl.data=hub:... deepspeed=zero3

One trainer step = one RL batch: rollouts from the current weights (zaya_train.rl.rollouts: plain samples and
online Markovian RSA aggregation rounds) -> verifier rewards -> group advantages -> `rl.epochs` passes of
`rl.minibatches` optimizer steps, each through the trainer's shared step (non-finite guardrails, DeepSpeed,
checkpoints, metrics, SIGTERM) -> weight sync into the rollout engine after every optimizer step.

- The loss spine (zaya_train.rl.algorithms): advantages `rl.advantage`, dynamic sampling, DPPO binary-TV or PPO
  clipping against `logp_old` (the trainer's own logprobs of the batch before its first update, under router
  replay: a no-grad recompute when a batch gets several optimizer steps, the training forward itself when it gets
  one), truncated importance sampling against the engine's logprobs, `rl.loss_aggregation`, the length
  bonus, the LZ77 canary and an optional k3 KL to the frozen initial policy.
- Router replay (`rl.router_replay`): every trainer forward over a rollout routes each token, in every layer, to
  the expert the engine chose while sampling it. `rl/logprob_diff_max` is the largest |trainer - engine| logprob
  of a sampled token with replay, `rl/logprob_diff_max_noreplay` without (every `rl.diagnostic_interval` steps),
  `rl/routing_mismatch_frac` the share of (token, layer) decisions where the trainer's router, in the training
  forward, picks another expert than the engine did: the MoE train/inference mismatch. The other routing's
  forward runs only over rows with a mismatch at or before their last scored token (on a row whose decisions all
  agree there, both routings compute the same logprobs), after the micro-batch's backward has freed its graph.
  In fp32 on the CPU no row differs; in bf16 most long rows differ somewhere, so expect up to a full forward.
- Expert biases stay fixed during RL unless `rl.update_expert_biases`: the balancer would move them from the
  replayed loads, changing the rollout policy's routing by something no gradient step accounts for.
- Weight sync: under ZeRO 0-2 the engine decodes the training model itself, and sync only invalidates its
  decode caches; under ZeRO-3 it keeps a full copy, refreshed by gathering the partitions (`time/sync_s`).
- State in the checkpoint (data_state.json): problems and sampling seeds are functions of (seed, step, rank), so
  the step number is the prompt-source position and the RNG; the rest is the canary and sample counters, the
  length bonus' running solve rates and the compute counters.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zaya_train.data import IGNORE_INDEX, load_tokenizer
from zaya_train.loading import load_model, tokenizer_dir
from zaya_train.model import ZayaForCausalLM
from zaya_train.rl import algorithms
from zaya_train.rl.environments import FilteredSource, adaptive_sources, environment_source
from zaya_train.rl.filtering import filter_solved
from zaya_train.rl.rollouts import (
    Group,
    RolloutCollector,
    kind_name,
    rollout_metrics,
    rollout_totals,
    step_seed,
)
from zaya_train.rl.shared_prompts import shared_prompt_forward
from zaya_train.rollout import RolloutEngine
from zaya_train.rsa import Trajectory
from zaya_train.train.config import ConfigError, RunConfig
from zaya_train.train.engine import DistInfo
from zaya_train.train.trainer import MicroBatch, StepResult, StepRunner, reduce_named, reduce_over_ranks

log = logging.getLogger("zaya_train")


def policy_tokenizer(cfg: RunConfig, run_dir: Path, info: DistInfo):
    """The tokenizer that travels with `model.init_from`, saved (by rank 0) as the run's own, so that the run's
    checkpoints load and export like any other run's."""
    if cfg.model.init_from is None:
        raise ConfigError(f"model.init_from: recipe={cfg.recipe} needs the policy to start from (a run directory, a "
                          "trainer checkpoint or an HF directory)")
    tokenizer = load_tokenizer(tokenizer_dir(cfg.model.init_from))
    if info.rank == 0:
        tokenizer.save_pretrained(run_dir / "tokenizer")
    return tokenizer


class RowBatch:
    """Rollouts as right-padded training rows: `input_ids` = prompt + response, `mask` on the positions whose
    next token is a response token (where the model's `logprobs[:, t]` scores it), the engine's logprobs and
    the advantages laid out the same way, and the engine's expert ids for replay."""

    FIELDS = ("input_ids", "labels", "expert_ids", "engine_logp", "mask", "real", "advantages")

    def __init__(self, rows: list[tuple[Any, float]], pad_id: int, num_layers: int, device: torch.device) -> None:
        self.prompt_lens = [len(t.prompt_ids) for t, _ in rows]
        lengths = [len(t.prompt_ids) + len(t.token_ids) for t, _ in rows]
        width = max(lengths)
        # Whole-batch ops on Python lists: a handful of tensor ops per row would cost more than the rows' data.
        self.input_ids = torch.tensor([t.prompt_ids + t.token_ids + [pad_id] * (width - n)
                                       for (t, _), n in zip(rows, lengths)], dtype=torch.long)
        self.labels = torch.tensor([[IGNORE_INDEX] * len(t.prompt_ids) + t.token_ids + [IGNORE_INDEX] * (width - n)
                                    for (t, _), n in zip(rows, lengths)], dtype=torch.long)
        # Row b scores its response at columns P_b - 1 .. P_b + R_b - 2 (logprobs[:, t] scores token t + 1).
        self.engine_logp = torch.tensor([[0.0] * (len(t.prompt_ids) - 1) + list(t.logprobs) + [0.0] * (width - n + 1)
                                         for (t, _), n in zip(rows, lengths)], dtype=torch.float32)
        column_W = torch.arange(width)
        prompt_lens_B1, lengths_B1 = torch.tensor(self.prompt_lens)[:, None], torch.tensor(lengths)[:, None]
        self.mask = (column_W >= prompt_lens_B1 - 1) & (column_W < lengths_B1 - 1)
        self.real = column_W < lengths_B1
        self.expert_ids = torch.zeros((len(rows), width, num_layers), dtype=torch.long)
        self.expert_ids[self.real] = torch.cat([t.expert_ids for t, _ in rows]).to(torch.long)
        self.advantages = torch.tensor([a for _, a in rows], dtype=torch.float32)
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name).to(device))
        # Row b's prompt is distinct prompt number prompt_of[b]: the same tokens and the same recorded routing.
        first_of: dict[tuple, int] = {}
        self.prompt_of = [
            first_of.setdefault((tuple(t.prompt_ids), t.expert_ids[: len(t.prompt_ids)].to(torch.long).cpu().numpy().tobytes()),
                                len(first_of))
            for t, _ in rows
        ]

    def select(self, rows_B: torch.Tensor) -> RowBatch:
        """The rows where the boolean `rows_B` is True, as a batch of their own."""
        subset = object.__new__(RowBatch)
        for name in self.FIELDS:
            setattr(subset, name, getattr(self, name)[rows_B])
        kept = rows_B.tolist()
        subset.prompt_lens = [n for n, keep in zip(self.prompt_lens, kept) if keep]
        renumbered: dict[int, int] = {}
        subset.prompt_of = [renumbered.setdefault(u, len(renumbered)) for u, keep in zip(self.prompt_of, kept) if keep]
        return subset

    @property
    def repeats_prompts(self) -> bool:
        return len(set(self.prompt_of)) < len(self.prompt_of)


@dataclass
class RoutingGaps:
    """One step's train/inference mismatch: the largest |trainer - engine| logprob of a sampled token with router
    replay and without (`diagnose`: measure the routing the training forward does not use as well), and the
    (token, layer) routing decisions where the trainer's router picked another expert than the engine."""

    diagnose: bool
    replay: float = 0.0
    noreplay: float = 0.0
    decisions: float = 0.0
    mismatched: float = 0.0

    def record(self, replay: bool, gap: float) -> None:
        if replay:
            self.replay = max(self.replay, gap)
        else:
            self.noreplay = max(self.noreplay, gap)


class WeightSync:
    """Makes the rollout engine generate with the trainer's current weights. Under ZeRO 0-2 the engine decodes the
    training module itself; under ZeRO-3 it holds a copy in the training dtype (balancing biases fp32, as in the
    trainer), refreshed from the gathered partitions."""

    def __init__(self, engine, device: torch.device, compile_decode: bool = False) -> None:
        self.engine = engine
        module = engine.module
        self.partitioned = any(hasattr(p, "ds_id") for p in module.parameters())
        decoded = module
        if self.partitioned:
            dtype = next(module.parameters()).dtype
            decoded = ZayaForCausalLM(module.config).to(device=device, dtype=dtype).eval()
            for router in decoded.routers():
                router.balancing_biases = router.balancing_biases.float()
        self.rollout = RolloutEngine(decoded, compile=compile_decode)
        self.seconds = 0.0

    def __call__(self) -> None:
        start = time.perf_counter()
        module = self.engine.module
        if self.partitioned:
            import deepspeed

            # One gather of the whole model at a time: the copy is loaded in place from the gathered tensors.
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                self.rollout.load_weights(module)
        else:
            self.rollout.load_weights(module)
        # Rebuild the decode step's rearranged weights now, so that the update's cost shows here, not in generation.
        self.rollout.decode_step.layer_weights()
        self.seconds += time.perf_counter() - start


class RLSource:
    """The trainer's batch source for `recipe=rl` (see the module docstring)."""

    exhausted_reason = "compute_budget"

    def __init__(self, cfg: RunConfig, run_dir: Path, info: DistInfo) -> None:
        self.cfg, self.rl, self.info, self.run_dir = cfg, cfg.rl, info, run_dir
        self.tokenizer = policy_tokenizer(cfg, run_dir, info)
        self.stats: dict[str, int] = {}
        try:
            self.prompts = environment_source(self.rl, cfg.seed)
        except ValueError as err:
            raise ConfigError(f"rl.data: {err}") from err
        self.curricula = adaptive_sources(self.prompts)
        self.filtered: dict[str, Any] | None = None
        rounds = len(self.rl.codesign.problems_per_round(self.rl.prompts_per_step))
        self.kinds = ["plain"] + [kind_name(t) for t in range(1, rounds + 1)]
        self.state: dict[str, Any] = {
            "p_star": {kind: 0.0 for kind in self.kinds},
            "compute": {"prefill": 0, "decode": 0, "trained": 0},
            "samples": {"generated": 0, "dropped": 0, "trained": 0, "degenerate": 0},
        }

    def attach(self, engine, info: DistInfo) -> None:
        self.engine = engine
        self.sync = WeightSync(engine, info.device, self.rl.compile_decode)
        self.sync()  # weights loaded from a checkpoint in place: drop any decode cache built before
        try:
            self.collector = RolloutCollector(self.sync.rollout, self.tokenizer, self.prompts, self.rl, self.cfg.rsa,
                                              self.cfg.seed, info.rank, info.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.rl.filter.pass_rate is not None:
            self.filtered = filter_solved(self.collector, self.rl, self.cfg.seed, self.run_dir, info.rank,
                                          info.world_size)
            if not self.filtered["kept"]:
                raise ConfigError(f"rl.filter.pass_rate: the starting policy solves every one of the "
                                  f"{self.filtered['examined']} problems examined at a rate >= {self.rl.filter.pass_rate}"
                                  "; raise rl.filter.pass_rate or rl.filter.pool")
            self.collector.source = FilteredSource(self.prompts, self.filtered["kept"])
        self.reference = None
        if self.rl.kl_coef > 0:
            self.reference = load_model(self.cfg.model.init_from).to(info.device).eval()
            self.reference.requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return {**self.state, "curricula": [c.state_dict() for c in self.curricula]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for curriculum, saved in zip(self.curricula, state.pop("curricula", [])):
            curriculum.load_state_dict(saved)
        self.state = state

    def finish(self, engine, step: int, loss: float, metrics, info: DistInfo) -> None:
        return None

    # ---------------------------------------------------------------------------------------------------------

    def _advantages(self, groups: list[Group], step: int) -> list[tuple[Any, float]]:
        rl = self.rl
        rows = []
        for group in groups:
            rewards_1G = torch.tensor([group.rewards], dtype=torch.float64)
            bonus = None
            if rl.length_bonus:
                kind = group.kind
                lengths = torch.tensor([[len(t.token_ids) for t in group.trajectories]], dtype=torch.float64)
                bonus = algorithms.length_bonus(
                    rewards_1G, lengths, l_max=float(self._max_new_tokens(group)), p_star=self.state["p_star"][kind],
                    coef=algorithms.length_bonus_coef(step),
                )
            advantages = algorithms.group_advantages(rewards_1G, rl.advantage, length_bonus=bonus)[0].tolist()
            rows += list(zip(group.trajectories, advantages))
        return rows

    def _max_new_tokens(self, group: Group) -> int:
        return self.rl.max_new_tokens if group.kind == "plain" else self.rl.codesign.max_new_tokens

    def _forward(self, batch: RowBatch, replay: bool, model=None):
        """Logprobs, expert ids and router picks of the batch's rows (`rl.shared_prompt_forward`: each distinct
        prompt once, where prompts repeat)."""
        model = model or self.engine
        if self.rl.shared_prompt_forward and batch.repeats_prompts and not self.sync.partitioned:
            return shared_prompt_forward(model, self.engine.module.config, batch, replay, self.rl.temperature,
                                         self.tokenizer.pad_token_id or 0)
        return model(
            batch.input_ids, labels=batch.labels, expert_ids=batch.expert_ids if replay else None,
            return_logits=False, return_logprobs=True, logprob_temperature=self.rl.temperature,
            return_expert_ids=True,
        )

    @torch.no_grad()
    def _observe_routing(self, gaps: RoutingGaps, batch: RowBatch, logp_BS: torch.Tensor,
                         router_ids_BSL: torch.Tensor) -> Callable[[], None] | None:
        """Records the gaps of a forward before the update with `rl.router_replay`'s routing (its logprobs and
        its routers' own picks). When `gaps.diagnose`, returns the other routing's forward, to run on the same
        weights (None when no rank has one to run). A row whose routers pick the engine's experts at every token
        and layer up to its last scored token computes the same logprobs under the other routing (by induction
        over layers; attention and convolutions are causal), so that forward runs only over the other rows."""
        replay = self.rl.router_replay
        real_BSL = batch.real[..., None].expand_as(router_ids_BSL)
        differs_BSL = (router_ids_BSL != batch.expert_ids) & real_BSL
        gaps.decisions += float(real_BSL.sum())
        gaps.mismatched += float(differs_BSL.sum())
        gaps.record(replay, _max_gap(logp_BS, batch))
        if not gaps.diagnose:
            return None
        scored_BS = batch.mask.int().flip(1).cummax(dim=1).values.flip(1).bool()  # up to the last scored token
        differs_B = (differs_BSL & scored_BS[..., None]).flatten(1).any(dim=1)
        gaps.record(not replay, _max_gap(logp_BS, batch, ~differs_B))
        here = bool(differs_B.any())
        needed = here
        if self.sync.partitioned:  # a ZeRO-3 forward is a collective: all ranks run one if any rank needs it
            (needed,) = reduce_over_ranks([float(here)], self.info.device, dist.ReduceOp.MAX)
        if not needed:
            return None
        rows = batch.select(differs_B if here else torch.arange(len(differs_B), device=differs_B.device) == 0)

        @torch.no_grad()
        def other_routing() -> None:
            other_BS = self._forward(rows, not replay).logprobs.float()
            if here:
                gaps.record(not replay, _max_gap(other_BS, rows))

        return other_routing

    def _micro_batch(self, batch: RowBatch, logp_old: torch.Tensor | None, logp_ref: torch.Tensor | None,
                     denominator: float, fractions: list[float], gaps: RoutingGaps) -> MicroBatch:
        """The policy loss of one micro-batch. `logp_old` None: this forward is the first over these rows since the
        rollout (one optimizer step per batch), so its own detached logprobs are logp_old."""
        rl = self.rl
        out = self._forward(batch, rl.router_replay)
        logp = out.logprobs.float()
        other_routing = None
        if logp_old is None:
            logp_old = logp.detach()
            other_routing = self._observe_routing(gaps, batch, logp_old, out.router_ids)
        importance = {"logp_rollout_BT": batch.engine_logp, "tis_cap": rl.tis_cap} if rl.tis_cap > 0 else {}
        policy = algorithms.policy_loss(
            logp, logp_old, batch.advantages, batch.mask, trust_region=rl.trust_region, delta=rl.delta,
            eps_low=rl.clip_low, eps_high=rl.clip_high, **importance,
        )
        max_len = float(rl.max_new_tokens) if rl.loss_aggregation == "dr_grpo" else None
        aggregate = functools.partial(algorithms.aggregate, mask_BT=batch.mask, kind=rl.loss_aggregation,
                                      max_len=max_len, denominator=denominator)
        loss = aggregate(policy.loss_BT)
        if logp_ref is not None:
            loss = loss + rl.kl_coef * aggregate(algorithms.k3_kl(logp, logp_ref, batch.mask))
        tokens = float(batch.mask.sum())
        fractions[0] += tokens
        for i, value in enumerate((policy.masked_frac, policy.tis_truncated_frac, policy.ratio_capped_frac), 1):
            fractions[i] += float(value) * tokens
        # DeepSpeed averages gradients over ranks; the loss is already normalised by the global count.
        world = self.info.world_size
        loads = real_token_loads(out.expert_ids, batch.real, self.engine.module.config.num_router_classes)
        return MicroBatch(loss * world, loss.detach() * world * self.gas, loads, int(batch.real.sum()),
                          after_backward=other_routing)

    def run_step(self, step: int, runner: StepRunner) -> StepResult | None:
        rl, device = self.rl, self.info.device
        if rl.max_compute_tokens is not None and sum(self.state["compute"].values()) >= rl.max_compute_tokens:
            return None
        self.gas = self.engine.gradient_accumulation_steps()
        sync_before = self.sync.seconds
        start = time.perf_counter()
        rollouts = self.collector.collect(step)
        generate_s = time.perf_counter() - start - rollouts.reward_s

        reduced = reduce_named(rollout_totals(rollouts, self.kinds), device)
        metrics = rollout_metrics(reduced, self.kinds)
        metrics.update(self._curriculum_step(rollouts))
        if self.filtered is not None:
            metrics.update({f"prompts/filter_{k}": len(self.filtered["kept"]) if k == "kept" else self.filtered[k]
                            for k in ("examined", "dropped", "kept")})
        # The length bonus' p* is the running maximum of each prompt type's solve rate over whole steps (all ranks).
        for kind in self.kinds:
            if reduced[f"count/{kind}"]:
                self.state["p_star"][kind] = max(self.state["p_star"][kind], metrics[f"reward/{kind}"])

        rows = self._advantages(rollouts.trained, step)
        train_start = time.perf_counter()
        (most_rows,) = reduce_over_ranks([len(rows)], device, dist.ReduceOp.MAX)
        gaps = RoutingGaps(diagnose=step % rl.diagnostic_interval == 0)
        fractions, losses, skipped, tokens = [0.0] * 4, [], False, 0
        if most_rows == 0 and self.info.rank == 0:
            log.info("step %d: dynamic sampling dropped every group (equal rewards within each); no update", step)
        if most_rows > 0:  # no group kept anywhere: no optimizer step (a zero-gradient step still moves AdamW)
            # The same number of micro-batches on every rank (DeepSpeed's collectives count them): a rank with fewer
            # rows than another runs zero-weight rows.
            padding = int(most_rows) - len(rows)
            all_rows = rows + ([(self._dummy_trajectory(), 0.0)] * padding if padding else [])
            weights = [True] * len(rows) + [False] * padding
            micro_rows = max(1, -(-len(all_rows) // (rl.minibatches * self.gas)))
            # With one optimizer step per batch every row is trained before any update: its training forward is
            # the trainer's own pre-update computation, and no separate logp_old forward is needed.
            need_old = rl.epochs * rl.minibatches > 1
            logp_old, logp_ref = self._recompute(all_rows, weights, micro_rows, gaps, need_old)
            for epoch in range(rl.epochs):
                generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, step, self.info.rank, "epoch", epoch))
                order = torch.randperm(len(all_rows), generator=generator).tolist()
                for minibatch in _chunks(order, rl.minibatches):
                    counts = [sum(weights[i] for i in minibatch),
                              sum(len(all_rows[i][0].token_ids) * weights[i] for i in minibatch)]
                    rows_all, tokens_all = reduce_over_ranks([float(c) for c in counts], device)
                    if rows_all == 0:  # every rank drew only padding here
                        continue
                    denominator = tokens_all if rl.loss_aggregation == "token_mean" else rows_all
                    micro = [functools.partial(self._run_chunk, [all_rows[i] for i in chunk],
                                               [weights[i] for i in chunk], [logp_old[i] for i in chunk],
                                               [logp_ref[i] for i in chunk] if logp_ref else None, denominator,
                                               fractions, gaps)
                             for chunk in _chunks(minibatch, self.gas)]
                    update = runner.update(micro, scale_wrt_gas=False, update_biases=rl.update_expert_biases)
                    losses.append(update.loss)
                    skipped |= update.skipped
                    self.sync()
            tokens = sum(len(t.prompt_ids) + len(t.token_ids) for t, _ in rows) * rl.epochs
        train_s = time.perf_counter() - train_start - (self.sync.seconds - sync_before)

        compute = self.state["compute"]
        step_compute = reduce_over_ranks([rollouts.prefill_tokens, rollouts.decode_tokens, tokens], device)
        for key, value in zip(("prefill", "decode", "trained"), step_compute):
            compute[key] += int(value)
        for key in ("generated", "dropped", "trained", "degenerate"):
            self.state["samples"][key] += metrics[f"samples/{key}"]
        (diff_replay, diff_noreplay) = reduce_over_ranks([gaps.replay, gaps.noreplay], device, dist.ReduceOp.MAX)
        frac_tokens, masked, truncated, capped, decisions, mismatched = reduce_over_ranks(
            [*fractions, gaps.decisions, gaps.mismatched], device)
        gap_metrics = {"rl/logprob_diff_max": diff_replay, "rl/logprob_diff_max_noreplay": diff_noreplay}
        if not gaps.diagnose:  # the other routing was not measured
            del gap_metrics["rl/logprob_diff_max_noreplay" if rl.router_replay else "rl/logprob_diff_max"]
        metrics.update({
            **gap_metrics,
            "rl/routing_mismatch_frac": mismatched / max(decisions, 1.0),
            "rl/masked_frac": masked / max(frac_tokens, 1.0),
            "rl/tis_truncated_frac": truncated / max(frac_tokens, 1.0),
            "rl/ratio_capped_frac": capped / max(frac_tokens, 1.0),
            "rl/optimizer_steps": len(losses),
            "time/generate_s": generate_s,
            "time/reward_s": rollouts.reward_s,
            "time/train_s": train_s,
            "time/sync_s": self.sync.seconds - sync_before,
            **{f"compute/{k}_tokens": v for k, v in compute.items()},
            "compute/total_tokens": sum(compute.values()),
            **({"compute/budget_fraction": sum(compute.values()) / rl.max_compute_tokens}
               if rl.max_compute_tokens is not None else {}),
            **{f"samples_total/{k}": v for k, v in self.state["samples"].items()},
        })
        finite = [x for x in losses if math.isfinite(x)]
        loss = sum(finite) / len(finite) if finite else float("nan")
        return StepResult(loss, tokens, skipped, metrics)

    def _curriculum_step(self, rollouts) -> dict[str, float]:
        """Every rank's plain-group results, in rank order, update each curriculum identically on every rank."""
        if not self.curricula:
            return {}
        from zaya_train.rl.curriculum import DIFFICULTY_KEY, ENV_KEY

        results = []
        for group in rollouts.groups:
            reference = getattr(group.problem.reference, "reference", group.problem.reference)
            if group.kind == "plain" and isinstance(reference, dict) and ENV_KEY in reference:
                solved = sum(r >= 1.0 for r in group.rewards) / len(group.rewards)
                results.append((reference[ENV_KEY], int(reference[DIFFICULTY_KEY]), solved))
        if self.info.world_size > 1:
            gathered: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        metrics: dict[str, float] = {}
        for curriculum in self.curricula:
            curriculum.observe(results)
            metrics.update(curriculum.metrics())
        return metrics

    @torch.no_grad()
    def _recompute(self, all_rows, weights, micro_rows: int, gaps: RoutingGaps, need_old: bool):
        """No-grad forwards before the first update, in chunks of training micro-batch size: `logp_old` (the
        trainer's own logprobs of the batch, with router replay when on, and its routing gaps) when `need_old`;
        the reference policy's logprobs when a KL term is on. Without `need_old` (one optimizer step per batch)
        the training forward itself gives logp_old and the routing gaps."""
        rl = self.rl
        logp_old, logp_ref = [], []
        if not (need_old or self.reference is not None):
            return [None] * len(all_rows), logp_ref
        for first in range(0, len(all_rows), micro_rows):
            chunk = range(first, min(first + micro_rows, len(all_rows)))
            batch = self._batch([all_rows[i] for i in chunk], [weights[i] for i in chunk])
            if need_old:
                out = self._forward(batch, rl.router_replay)
                values = out.logprobs.float()
                other_routing = self._observe_routing(gaps, batch, values, out.router_ids)
                if other_routing is not None:
                    other_routing()
                logp_old += list(values)
            if self.reference is not None:
                logp_ref += list(self._forward(batch, rl.router_replay, self.reference).logprobs.float())
        return (logp_old or [None] * len(all_rows)), logp_ref

    def _batch(self, rows, weights: list[bool]) -> RowBatch:
        batch = RowBatch(rows, self.tokenizer.pad_token_id or 0, self.engine.module.config.num_hidden_layers,
                         self.info.device)
        weights_B1 = torch.tensor(weights, device=self.info.device)[:, None]
        batch.mask &= weights_B1
        batch.real &= weights_B1
        return batch

    def _run_chunk(self, rows, weights, logp_old, logp_ref, denominator: float, fractions: list[float],
                   gaps: RoutingGaps) -> MicroBatch:
        if not rows:  # fewer rows than micro-batches: a zero-weight row keeps DeepSpeed's count
            rows, weights, logp_old = [(self._dummy_trajectory(), 0.0)], [False], [None]
            logp_ref = [None] if logp_ref is not None else None
        batch = self._batch(rows, weights)
        width = batch.input_ids.shape[1]
        old = torch.stack([_fit(v, width) for v in logp_old]).to(self.info.device) if logp_old[0] is not None else None
        ref = torch.stack([_fit(v, width) for v in logp_ref]).to(self.info.device) if logp_ref else None
        return self._micro_batch(batch, old, ref, denominator, fractions, gaps)

    def _dummy_trajectory(self) -> Trajectory:
        """A two-token row that only pads a rank's micro-batch count; its weight is zero."""
        tokenizer, layers = self.tokenizer, self.engine.module.config.num_hidden_layers
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
        last = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return Trajectory("padding", 0, [first], [last], [0.0], torch.zeros(2, layers, dtype=torch.long), "length",
                          parents=())


def _max_gap(logp_BS: torch.Tensor, batch: RowBatch, rows_B: torch.Tensor | None = None) -> float:
    """The largest |logp - engine logp| over the batch's weighted response tokens (of `rows_B` only, if given)."""
    mask_BS = batch.mask if rows_B is None else batch.mask & rows_B[:, None]
    gap_BS = (logp_BS - batch.engine_logp).abs().masked_fill(~mask_BS, 0.0)
    return float(gap_BS.max())


def real_token_loads(expert_ids_BSL: torch.Tensor, real_BS: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Tokens per router class and layer [L, classes] over the real tokens of a padded batch (padding and
    zero-weight rows would otherwise count as load on whatever class they were given)."""
    ids_NL = expert_ids_BSL[real_BS]
    layers = ids_NL.shape[-1]
    offsets_L = torch.arange(layers, device=ids_NL.device) * num_classes
    return torch.bincount((ids_NL + offsets_L).flatten(), minlength=layers * num_classes).view(layers, num_classes)


def _fit(values: torch.Tensor | None, width: int) -> torch.Tensor:
    """A row of logprobs computed in a wider (or narrower) padded batch, cut or padded to `width` (None: zeros)."""
    if values is None:
        return torch.zeros(width)
    if values.shape[0] >= width:
        return values[:width]
    return torch.cat([values, values.new_zeros(width - values.shape[0])])


def _chunks(items: list[int], parts: int) -> list[list[int]]:
    """`items` split into `parts` consecutive, nearly equal chunks (some empty when there are fewer items)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out
