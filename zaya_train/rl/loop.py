"""`recipe=rl`: the RL stage as a batch source of the one trainer (zaya_train.train.trainer).

    zaya-train recipe=rl model.init_from=runs/nano/base                        # plain RL on the nano task
    zaya-train recipe=rl model.init_from=runs/nano/base rl.codesign.share=0.5 rl.codesign.rounds=2
    zaya-train recipe=rl rl=zaya1 model.init_from=exports/zaya1-sft rl.data=hub:... deepspeed=zero3

One trainer step = one RL batch: rollouts from the current weights (zaya_train.rl.rollouts: plain samples and
online Markovian RSA aggregation rounds) -> verifier rewards -> group advantages -> `rl.epochs` passes of
`rl.minibatches` optimizer steps, each through the trainer's shared step (non-finite guardrails, DeepSpeed,
checkpoints, metrics, SIGTERM) -> weight sync into the rollout engine after every optimizer step.

- The loss spine (zaya_train.rl.algorithms): advantages `rl.advantage`, dynamic sampling, DPPO binary-TV or PPO
  clipping against `logp_old` (the trainer's own recompute of the batch, under router replay, before the first
  update), truncated importance sampling against the engine's logprobs, `rl.loss_aggregation`, the length
  bonus, the LZ77 canary and an optional k3 KL to the frozen initial policy.
- Router replay (`rl.router_replay`): every trainer forward over a rollout routes each token, in every layer, to
  the expert the engine chose while sampling it. `rl/logprob_diff_max` is the largest |trainer - engine| logprob
  of a sampled token with replay, `rl/logprob_diff_max_noreplay` without: the MoE train/inference mismatch.
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zaya_train.data import load_tokenizer
from zaya_train.loading import load_model, tokenizer_dir
from zaya_train.model import ZayaForCausalLM
from zaya_train.rl import algorithms
from zaya_train.rl.prompts import prompt_source
from zaya_train.rl.rollouts import (
    Group,
    RolloutCollector,
    kind_name,
    rollout_metrics,
    rollout_totals,
    step_seed,
)
from zaya_train.rollout import RolloutEngine
from zaya_train.train.config import ConfigError, RunConfig
from zaya_train.train.engine import DistInfo
from zaya_train.train.trainer import MicroBatch, StepResult, StepRunner

log = logging.getLogger("zaya_train")

IGNORE_INDEX = -100


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


class RowBatch:
    """Rollouts as right-padded training rows: `input_ids` = prompt + response, `mask` on the positions whose
    next token is a response token (where the model's `logprobs[:, t]` scores it), the engine's logprobs and
    the advantages laid out the same way, and the engine's expert ids for replay."""

    def __init__(self, rows: list[tuple[Any, float]], pad_id: int, num_layers: int, device: torch.device) -> None:
        width = max(len(t.prompt_ids) + len(t.token_ids) for t, _ in rows)
        batch = len(rows)
        self.input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
        self.labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        self.expert_ids = torch.zeros((batch, width, num_layers), dtype=torch.long)
        self.engine_logp = torch.zeros((batch, width))
        self.mask = torch.zeros((batch, width), dtype=torch.bool)
        for b, (t, _) in enumerate(rows):
            prompt, response = len(t.prompt_ids), len(t.token_ids)
            self.input_ids[b, : prompt + response] = torch.tensor(t.prompt_ids + t.token_ids)
            self.labels[b, prompt : prompt + response] = torch.tensor(t.token_ids)
            self.expert_ids[b, : prompt + response] = t.expert_ids
            self.engine_logp[b, prompt - 1 : prompt + response - 1] = torch.tensor(t.logprobs)
            self.mask[b, prompt - 1 : prompt + response - 1] = True
        self.advantages = torch.tensor([a for _, a in rows], dtype=torch.float32)
        for name in ("input_ids", "labels", "expert_ids", "engine_logp", "mask", "advantages"):
            setattr(self, name, getattr(self, name).to(device))
        self.tokens = sum(len(t.prompt_ids) + len(t.token_ids) for t, _ in rows)


class WeightSync:
    """Makes the rollout engine generate with the trainer's current weights."""

    def __init__(self, engine, device: torch.device) -> None:
        self.engine = engine
        module = engine.module
        self.partitioned = any(hasattr(p, "ds_id") for p in module.parameters())
        if self.partitioned:
            self.rollout = RolloutEngine(ZayaForCausalLM(module.config).to(device).eval())
        else:
            self.rollout = RolloutEngine(module)
        self.seconds = 0.0

    def __call__(self) -> None:
        start = time.perf_counter()
        module = self.engine.module
        if self.partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.rollout.load_weights(state)
        else:
            self.rollout.load_weights(module)
        # Rebuild the decode step's rearranged weights now, so that the update's cost shows here, not in generation.
        self.rollout.decode_step.layer_weights()
        self.seconds += time.perf_counter() - start


class RLSource:
    """The trainer's batch source for `recipe=rl` (see the module docstring)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, info: DistInfo) -> None:
        if cfg.model.init_from is None:
            raise ConfigError("model.init_from: recipe=rl needs the policy to start from (a run directory, a trainer "
                              "checkpoint or an HF directory)")
        self.cfg, self.rl, self.info = cfg, cfg.rl, info
        self.tokenizer = load_tokenizer(tokenizer_dir(cfg.model.init_from))
        if info.rank == 0:
            self.tokenizer.save_pretrained(run_dir / "tokenizer")
        self.stats: dict[str, int] = {}
        self.prompts = prompt_source(self.rl.data, cfg.seed)
        self.kinds = ["plain"] + [kind_name(t) for t in range(1, len(self.rl.codesign.problems_per_round(
            self.rl.prompts_per_step // info.world_size)) + 1)]
        self.state: dict[str, Any] = {
            "p_star": {kind: 0.0 for kind in self.kinds},
            "compute": {"prefill": 0, "decode": 0, "trained": 0},
            "samples": {"generated": 0, "dropped": 0, "trained": 0, "degenerate": 0},
        }

    def attach(self, engine, info: DistInfo) -> None:
        self.engine = engine
        self.sync = WeightSync(engine, info.device)
        self.sync()  # weights loaded from a checkpoint in place: drop any decode cache built before
        try:
            self.collector = RolloutCollector(self.sync.rollout, self.tokenizer, self.prompts, self.rl, self.cfg.rsa,
                                              self.cfg.seed, info.rank, info.world_size)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.reference = None
        if self.rl.kl_coef > 0:
            self.reference = load_model(self.cfg.model.init_from).to(info.device).eval()
            self.reference.requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
                self.state["p_star"][kind] = max(self.state["p_star"][kind], float(rewards_1G.mean()))
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

    def _logprobs(self, batch: RowBatch, replay: bool, model=None) -> torch.Tensor:
        out = (model or self.engine)(
            batch.input_ids, labels=batch.labels, expert_ids=batch.expert_ids if replay else None,
            return_logits=False, return_logprobs=True, logprob_temperature=self.rl.temperature,
        )
        return out.logprobs.float()

    def _micro_batch(self, batch: RowBatch, logp_old: torch.Tensor, logp_ref: torch.Tensor | None,
                     denominator: float, fractions: list[float]) -> MicroBatch:
        rl = self.rl
        out = self.engine(
            batch.input_ids, labels=batch.labels, expert_ids=batch.expert_ids if rl.router_replay else None,
            return_logits=False, return_logprobs=True, logprob_temperature=rl.temperature,
        )
        logp = out.logprobs.float()
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
        return MicroBatch(loss * world, loss.detach() * world * self.gas, out.tokens_per_expert, batch.tokens)

    def run_step(self, step: int, runner: StepRunner) -> StepResult:
        rl, device = self.rl, self.info.device
        self.gas = self.engine.gradient_accumulation_steps()
        sync_before = self.sync.seconds
        start = time.perf_counter()
        rollouts = self.collector.collect(step)
        generate_s = time.perf_counter() - start - rollouts.reward_s

        rows = self._advantages(rollouts.trained, step)
        num_layers = self.engine.module.config.num_hidden_layers
        pad_id = self.tokenizer.pad_token_id or 0
        train_start = time.perf_counter()
        # The same number of micro-batches on every rank (DeepSpeed's collectives count them): a rank with fewer
        # rows than another runs zero-weight rows.
        order = list(range(len(rows)))
        (most_rows,) = _all_reduce([len(rows)], device, dist.ReduceOp.MAX if _distributed() else None)
        padding_rows = int(most_rows) - len(rows) if rows else max(int(most_rows), 1)
        dummy = (rows[0][0] if rows else self._dummy_trajectory(rollouts), 0.0)
        all_rows = rows + [dummy] * padding_rows
        masks = [True] * len(rows) + [False] * padding_rows

        with torch.no_grad():
            logp_old, logp_ref, diffs = [], [], [0.0, 0.0]
            for chunk in _chunks(list(range(len(all_rows))), max(1, self.gas)):
                batch = RowBatch([all_rows[i] for i in chunk], pad_id, num_layers, device)
                batch.mask &= torch.tensor([masks[i] for i in chunk], device=device)[:, None]
                with_replay = self._logprobs(batch, rl.router_replay)
                without = self._logprobs(batch, not rl.router_replay)
                replayed, plain = (with_replay, without) if rl.router_replay else (without, with_replay)
                for j, values in enumerate((replayed, plain)):
                    gap = (values - batch.engine_logp).abs().masked_fill(~batch.mask, 0.0)
                    diffs[j] = max(diffs[j], float(gap.max()) if gap.numel() else 0.0)
                logp_old += list(with_replay)
                if self.reference is not None:
                    logp_ref += list(self._logprobs(batch, rl.router_replay, self.reference))

        fractions = [0.0, 0.0, 0.0, 0.0]
        losses, skipped, tokens = [], False, 0
        for epoch in range(rl.epochs):
            generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, step, self.info.rank, "epoch", epoch))
            order = torch.randperm(len(all_rows), generator=generator).tolist()
            for minibatch in _chunks(order, rl.minibatches):
                counts = [sum(masks[i] for i in minibatch),
                          sum(len(all_rows[i][0].token_ids) * masks[i] for i in minibatch)]
                rows_all, tokens_all = _all_reduce([float(c) for c in counts], device)
                denominator = max(tokens_all if rl.loss_aggregation == "token_mean" else rows_all, 1.0)
                micro = []
                for chunk in _chunks(minibatch, self.gas):
                    micro.append(functools.partial(self._run_chunk, all_rows, masks, chunk, logp_old, logp_ref,
                                                   denominator, fractions, pad_id, num_layers))
                update = runner.update(micro, scale_wrt_gas=False, update_biases=rl.update_expert_biases)
                losses.append(update.loss)
                skipped |= update.skipped
                tokens += update.tokens
                self.sync()
        train_s = time.perf_counter() - train_start - (self.sync.seconds - sync_before)

        totals = rollout_totals(rollouts, self.kinds)
        names = sorted(totals)
        reduced = dict(zip(names, _all_reduce([float(totals[k]) for k in names], device)))
        metrics = rollout_metrics(reduced, self.kinds)
        compute = self.state["compute"]
        step_compute = _all_reduce([rollouts.prefill_tokens, rollouts.decode_tokens, tokens], device)
        for key, value in zip(("prefill", "decode", "trained"), step_compute):
            compute[key] += int(value)
        for key in ("generated", "dropped", "trained", "degenerate"):
            self.state["samples"][key] += metrics[f"samples/{key}"]
        (diff_replay, diff_noreplay) = _all_reduce(diffs, device, dist.ReduceOp.MAX if _distributed() else None)
        frac_tokens, masked, truncated, capped = _all_reduce(fractions, device)
        metrics.update({
            "rl/logprob_diff_max": diff_replay,
            "rl/logprob_diff_max_noreplay": diff_noreplay,
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
            **{f"samples_total/{k}": v for k, v in self.state["samples"].items()},
        })
        finite = [x for x in losses if math.isfinite(x)]
        loss = sum(finite) / len(finite) if finite else float("nan")
        return StepResult(loss, tokens, skipped, metrics)

    def _run_chunk(self, all_rows, masks, chunk, logp_old, logp_ref, denominator, fractions, pad_id,
                   num_layers) -> MicroBatch:
        device = self.info.device
        if not chunk:  # fewer rows than micro-batches: a zero-weight row keeps DeepSpeed's count
            chunk, weight = [0], False
        else:
            weight = True
        batch = RowBatch([all_rows[i] for i in chunk], pad_id, num_layers, device)
        keep = torch.tensor([masks[i] and weight for i in chunk], device=device)
        batch.mask &= keep[:, None]
        width = batch.input_ids.shape[1]
        old = torch.stack([_fit(logp_old[i], width) for i in chunk]).to(device)
        ref = torch.stack([_fit(logp_ref[i], width) for i in chunk]).to(device) if logp_ref else None
        return self._micro_batch(batch, old, ref, denominator, fractions)

    def _dummy_trajectory(self, rollouts):
        return rollouts.groups[0].trajectories[0]


def _fit(values: torch.Tensor, width: int) -> torch.Tensor:
    """A row of logprobs computed in a wider (or narrower) padded batch, cut or padded to `width`."""
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


def rl_source(cfg: RunConfig, run_dir: Path, info: DistInfo) -> RLSource:
    return RLSource(cfg, run_dir, info)
