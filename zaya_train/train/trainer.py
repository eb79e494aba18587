"""The one training loop on a DeepSpeed engine: pretraining, midtraining and SFT, and (through other batch sources)
the aggregation warm start and RL.

    zaya-train recipe=pretrain data.path=corpus.jsonl run_dir=runs/p1 trainer.max_steps=1000
    torchrun --nproc_per_node=2 -m zaya_train recipe=nano_pretrain deepspeed.zero_stage=2

A `BatchSource` decides what one trainer step trains on and how: `PretrainSource` (packed windows, fused
cross-entropy), `zaya_train.rl.loop.RLSource` (rollouts, policy loss, several optimizer steps per batch),
`zaya_train.rl.warmstart.WarmStartSource`. Every optimizer step of every source goes through `StepRunner.update`,
and the loop around it (resume, checkpoints, metrics, progress bar, signals, end-of-run hooks) is shared.

Per optimizer step: `gradient_accumulation_steps` micro-batches forward + backward, one DeepSpeed step, then the
expert-bias balancer's update from the step's global expert loads. A micro-batch whose loss is NaN or Inf (on
any rank) contributes no gradient and leaves the step's loss and expert loads (its backward runs on the zeroed
loss, so DeepSpeed's accumulation count stays in step); a step whose gradients are non-finite is skipped by the
optimizer; both are counted, and `trainer.max_nonfinite_in_row` skipped steps in a row stop the run. With
`data.num_epochs` set, the run stops with a checkpoint when the data is used up. SIGTERM or SIGUSR1 (Slurm
preemption) finishes the current step, saves a checkpoint and exits cleanly. A checkpoint is never written from
non-finite weights.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from zaya_train.data import LoaderConfig, PackedLoader
from zaya_train.loading import latest_checkpoint, load_model, read_trainer_state, resolve_checkpoint
from zaya_train.metrics import MetricsSink
from zaya_train.model import ZayaForCausalLM
from zaya_train.train import checkpoint as ckpt
from zaya_train.train.balancer import ExpertBiasBalancer
from zaya_train.train.config import ConfigError, RunConfig
from zaya_train.train.data import build_training_data
from zaya_train.train.engine import (
    DistInfo,
    build_engine,
    grad_norm,
    init_distributed,
    resolve_dtype,
    skipped_steps,
)
from zaya_train.train.metrics import model_flops_per_token, peak_flops, throughput

log = logging.getLogger("zaya_train")


class TrainingDiverged(RuntimeError):
    pass


class _StopSignal:
    """Records SIGTERM / SIGUSR1; the loop checks it at step boundaries (all ranks agree through an all-reduce)."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not _distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def reduce_over_ranks(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """One all-reduce (`op`: SUM, MAX, ...) for several per-step numbers; the values themselves on one process."""
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def reduce_named(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sums of named per-step numbers over ranks, when ranks may hold different names (an environment or an
    outcome one rank did not see this step counts 0 there)."""
    if not _distributed():
        return dict(values)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(values))
    names = sorted(set().union(*gathered))
    return dict(zip(names, reduce_over_ranks([float(values.get(n, 0.0)) for n in names], device)))


def _weights_finite(engine) -> bool:
    local = all(bool(torch.isfinite(p.detach()).all()) for p in engine.module.parameters() if p.numel() > 0)
    return not _any_rank(not local, next(engine.module.parameters()).device)


def _initial_model(cfg: RunConfig, model_config) -> ZayaForCausalLM:
    if cfg.model.init_from is None:
        return ZayaForCausalLM(model_config)
    model = load_model(cfg.model.init_from, gradient_checkpointing=model_config.gradient_checkpointing,
                       kernels=model_config.kernels)
    if model.config.vocab_size != model_config.vocab_size:
        raise ConfigError(
            f"model.init_from: {cfg.model.init_from} has vocab_size {model.config.vocab_size}, the tokenizer needs "
            f"{model_config.vocab_size}"
        )
    if cfg.model.rope_theta is not None:
        # A phase that lengthens the context raises the RoPE base of the weights it starts from (ZAYA1: 10K at 4K
        # context, 1M at 32K, 5M at 131K); the tables are not stored, so recomputing them is the whole change.
        model.config.rope_parameters = {
            layer_type: {**params, "rope_theta": cfg.model.rope_theta}
            for layer_type, params in model.config.rope_parameters.items()
        }
        model.model.materialize_rope("cpu")
    return model


class MicroBatch(NamedTuple):
    """What one micro-batch's forward hands the shared step: `loss` to back-propagate, `value` (detached) to
    report, the forward's `tokens_per_expert`, the number of tokens it ran and, optionally, work to run once its
    backward has freed the graph and before the optimizer may step (a no-grad measurement on these weights)."""

    loss: torch.Tensor
    value: torch.Tensor
    tokens_per_expert: torch.Tensor
    tokens: int
    after_backward: Callable[[], None] | None = None


@dataclass
class Update:
    """One optimizer step: the mean reported value of its finite micro-batches (NaN if none) and whether the
    optimizer skipped it."""

    loss: float
    skipped: bool
    tokens: int


class StepRunner:
    """The optimizer step every batch source goes through, with its guardrails: forward and backward of each
    micro-batch, one DeepSpeed step, the expert-bias balancer, the non-finite counters and the stop after
    `trainer.max_nonfinite_in_row` skipped steps. Pretraining calls `update` once per trainer step; RL once per
    minibatch and epoch."""

    def __init__(self, engine, balancer: ExpertBiasBalancer, cfg: RunConfig, info: DistInfo, state: dict[str, Any]):
        self.engine, self.balancer, self.cfg, self.info, self.state = engine, balancer, cfg, info, state
        self.in_row = 0
        self.router_metrics: dict[str, float] = {}

    def update(
        self, micro_batches: Sequence[Callable[[], MicroBatch]], *, scale_wrt_gas: bool = True,
        update_biases: bool = True,
    ) -> Update:
        """Runs exactly `deepspeed.gradient_accumulation_steps` micro-batches (DeepSpeed counts them to find the
        step boundary) and the optimizer step. `scale_wrt_gas=False` when each micro-batch's loss is already
        normalised over the whole step. With `update_biases` False the balancer only measures the loads."""
        engine, device = self.engine, self.info.device
        if len(micro_batches) != engine.gradient_accumulation_steps():
            raise ValueError(
                f"{len(micro_batches)} micro-batches for a step of deepspeed.gradient_accumulation_steps="
                f"{engine.gradient_accumulation_steps()}"
            )
        values, tokens, counted = [], 0, False
        skipped_before = skipped_steps(engine)
        for run in micro_batches:
            out = run()
            tokens += out.tokens
            finite = not _any_rank(not bool(torch.isfinite(out.value)), device)
            # A non-finite micro-batch still runs its backward and engine.step(), with its loss zeroed:
            # DeepSpeed finds the accumulation boundary (and ZeRO flushes its gradient buckets) by counting
            # them. Its gradient is zero, or non-finite where its activations are, and then the optimizer
            # skips the whole step.
            engine.backward(out.loss if finite else out.loss * 0.0, scale_wrt_gas=scale_wrt_gas)
            if out.after_backward is not None:
                out.after_backward()
            engine.step()
            if not finite:
                self.state["nonfinite_loss_micro_batches"] += 1
                continue
            self.balancer.accumulate(out.tokens_per_expert)
            values.append(float(out.value))
            counted = True
        skipped = not counted or skipped_steps(engine) > skipped_before
        value_sum, value_count = reduce_over_ranks([sum(values), len(values)], device)
        if skipped:
            self.state["skipped_steps"] += 1
            self.in_row += 1
            if self.balancer.num_accumulated:
                self.balancer.reset()
            if self.in_row >= self.cfg.trainer.max_nonfinite_in_row:
                raise TrainingDiverged(
                    f"{self.in_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                    f"{self.state['step'] + 1}); stopping. Lower optim.lr, check the data, or resume from the last "
                    "checkpoint."
                )
        else:
            self.in_row = 0
            self.router_metrics = self.balancer.step(update_biases=update_biases)
        return Update(value_sum / value_count if value_count else float("nan"), skipped, tokens)


@dataclass
class StepResult:
    """What a batch source reports for one trainer step: the loss to log, the tokens it trained on (this rank),
    whether any optimizer step of it was skipped, and its own metrics."""

    loss: float
    tokens: int
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)


class BatchSource(Protocol):
    """Where a trainer step's batches come from: the packed pretraining loader, or RL rollouts
    (zaya_train.rl.loop). Built before the model (it owns the tokenizer); `attach` hands it the engine."""

    tokenizer: Any
    stats: dict[str, int]
    exhausted_reason: str
    """The stop reason the summary gives when `run_step` returns None (e.g. "data_exhausted")."""

    def attach(self, engine, info: DistInfo) -> None: ...

    def run_step(self, step: int, runner: StepRunner) -> StepResult | None:
        """Runs one trainer step (one or more `runner.update` calls); None when there is nothing more to train on
        (the data is used up, a compute budget is spent): the run then stops with a checkpoint."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position, saved in every checkpoint (data_state.json)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self, engine, step: int, loss: float, metrics: MetricsSink, info: DistInfo) -> None:
        """After the last step of a run that was not interrupted (end-of-run evaluation)."""
        ...


SourceFactory = Callable[[RunConfig, Path, DistInfo], BatchSource]


class PretrainSource:
    """Packed windows of the pretraining / SFT / chain-sum data, `deepspeed.gradient_accumulation_steps`
    micro-batches per step, the fused cross-entropy. With `data.sources` it logs the share of each source in the
    step's tokens (`data/share/<name>`, padding excluded, all ranks) and since the start of the run
    (`data/share_total/<name>`, kept in the checkpoint)."""

    exhausted_reason = "data_exhausted"

    def __init__(self, cfg: RunConfig, run_dir: Path, info: DistInfo) -> None:
        self.cfg = cfg
        data = build_training_data(cfg.data, run_dir, cfg.seed, info.rank)
        self.tokenizer, self.stats = data.tokenizer, data.stats
        self.source_names = data.source_names
        self.source_tokens = [0] * len(self.source_names)
        self.draw_probabilities = {s.name: data.stats[f"data/mix/{s.name}/probability"] for s in cfg.data.sources}
        self.loader = PackedLoader(
            data.windows,
            LoaderConfig(micro_batch_size=cfg.data.micro_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                         num_epochs=cfg.data.num_epochs),
            rank=info.rank, world_size=info.world_size,
        )
        self._batches = None

    def attach(self, engine, info: DistInfo) -> None:
        self.engine, self.device = engine, info.device

    def run_step(self, step: int, runner: StepRunner) -> StepResult | None:
        if self._batches is None:
            self._batches = iter(self.loader)
        batches = [next(self._batches, None) for _ in range(self.cfg.deepspeed.gradient_accumulation_steps)]
        if any(b is None for b in batches):
            return None
        update = runner.update([functools.partial(self._forward, b) for b in batches])
        return StepResult(update.loss, update.tokens, update.skipped, self._source_shares(batches))

    def _source_shares(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        if not self.source_names:
            return {}
        ids = torch.cat([b["source_ids"].flatten() for b in batches])
        local = torch.bincount(ids[ids >= 0], minlength=len(self.source_names))
        step = [int(n) for n in reduce_over_ranks([float(n) for n in local.tolist()], self.device)]
        self.source_tokens = [a + b for a, b in zip(self.source_tokens, step, strict=True)]
        total, step_total = sum(self.source_tokens), sum(step)
        shares = {}
        for name, now, overall in zip(self.source_names, step, self.source_tokens, strict=True):
            shares[f"data/share/{name}"] = now / step_total if step_total else 0.0
            shares[f"data/share_total/{name}"] = overall / total if total else 0.0
        return shares

    def _forward(self, batch: dict[str, torch.Tensor]) -> MicroBatch:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        out = self.engine(
            batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"], return_logits=False
        )
        return MicroBatch(out.loss, out.loss.detach().float(), out.tokens_per_expert, batch["input_ids"].numel())

    def state_dict(self) -> dict[str, Any]:
        state = self.loader.state_dict()
        if self.source_names:
            state["source_tokens"] = dict(zip(self.source_names, self.source_tokens, strict=True))
            state["draw_probabilities"] = self.draw_probabilities
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("draw_probabilities", self.draw_probabilities)
        if saved.keys() != self.draw_probabilities.keys() or any(
            abs(saved[name] - p) > 1e-9 for name, p in self.draw_probabilities.items()
        ):
            # The position in the stream means nothing in a stream drawn with other probabilities.
            raise ConfigError(
                f"data.sources: the draw probabilities {self.draw_probabilities} differ from the checkpoint's "
                f"{saved} (the sources, their files or the tokenizer changed), so the resumed run would not continue "
                "the saved stream; restore them or start a new run_dir"
            )
        self.loader.load_state_dict(state)
        saved = state.get("source_tokens", {})
        self.source_tokens = [int(saved.get(name, 0)) for name in self.source_names]

    def finish(self, engine, step: int, loss: float, metrics: MetricsSink, info: DistInfo) -> None:
        if self.cfg.data.kind == "chain_sum" and self.cfg.trainer.eval_problems:
            _evaluate(self.cfg, engine, self.tokenizer, step, loss, metrics, info)


def train(
    cfg: RunConfig, run_dir: Path, on_finish: Callable[[Any], None] | None = None,
    source_factory: SourceFactory = PretrainSource,
) -> dict[str, Any]:
    """Runs the configured training; returns a summary (final step, last loss, why it stopped). `source_factory`
    builds the batch source (pretraining by default; `zaya_train.rl.loop.RLSource` for recipe=rl). `on_finish` is
    called with the DeepSpeed engine once training ends (e.g. to inspect or export the live model)."""
    info: DistInfo = init_distributed()
    # From the start: a scheduler's SIGUSR1 / SIGTERM during start-up (data, engine, checkpoint loading) would
    # otherwise kill the run; recorded here, it stops the run with a checkpoint after its first step.
    stop = _StopSignal()
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.rank == 0:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")

    source = source_factory(cfg, run_dir, info)
    tokenizer = source.tokenizer
    vocab = len(tokenizer)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    model_config = cfg.model.build(tokenizer_size=vocab, special_ids=special)
    if model_config.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size: {model_config.vocab_size} is smaller than the tokenizer's {vocab} tokens")

    resume_from = None
    if cfg.trainer.resume == "auto":
        resume_from = latest_checkpoint(run_dir)
    elif cfg.trainer.resume != "none":
        resume_from = resolve_checkpoint(cfg.trainer.resume)
    universal = False
    if resume_from is not None:
        saved_world = read_trainer_state(resume_from)["world_size"]
        if saved_world != info.world_size:
            log.info("resuming a world-size-%d checkpoint on %d ranks: converting it to a universal checkpoint",
                     saved_world, info.world_size)
            ckpt.ensure_universal(resume_from)
            universal = True

    dtype = resolve_dtype(cfg, info.device)
    model = _initial_model(cfg, model_config).to(info.device)
    model_config = model.config
    engine, scheduler = build_engine(model, cfg, dtype, load_universal=universal)
    balancer = ExpertBiasBalancer(engine.module.routers(), cfg.balancer)
    state = {"step": 0, "nonfinite_loss_micro_batches": 0, "skipped_steps": 0, "tokens": 0}
    if resume_from is not None:
        trainer_state, data_state, balancer_state = ckpt.load_checkpoint(resume_from, engine, universal)
        source.load_state_dict(data_state)
        balancer.load_state_dict(balancer_state)
        state.update({k: trainer_state[k] for k in state})
        if info.rank == 0:
            log.info("resumed from %s at step %d", resume_from, state["step"])
    source.attach(engine, info)
    runner = StepRunner(engine, balancer, cfg, info, state)

    flops_per_token = model_flops_per_token(model_config, cfg.data.seq_len)
    peak = peak_flops(info.device, cfg.trainer.peak_flops)
    metrics = MetricsSink(run_dir, cfg.wandb, info.rank, run_config=cfg)
    if source.stats and info.rank == 0:
        metrics.log(state["step"], float("nan"), {**source.stats, "event": "data"})
    progress = None
    if info.rank == 0 and cfg.trainer.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.trainer.max_steps, initial=state["step"], desc=cfg.recipe, dynamic_ncols=True)

    reason = "max_steps"
    saved_step = state["step"]
    last_loss = float("nan")
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    try:
        while state["step"] < cfg.trainer.max_steps:
            result = source.run_step(state["step"], runner)
            if result is None:
                reason = source.exhausted_reason
                if saved_step != state["step"]:
                    _save(run_dir, cfg, engine, state, source, balancer, info)
                break
            state["step"] += 1
            (tokens_all,) = reduce_over_ranks([result.tokens], info.device)
            state["tokens"] += int(tokens_all)
            window_tokens += int(tokens_all)
            window_steps += 1
            last_loss = result.loss

            if state["step"] % cfg.trainer.log_interval == 0 or state["step"] == cfg.trainer.max_steps:
                elapsed = time.perf_counter() - window_start
                lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.optim.lr
                record = {
                    "lr": lr,
                    "tokens": state["tokens"],
                    "grad_norm": grad_norm(engine),
                    "skipped_steps": state["skipped_steps"],
                    "nonfinite_loss_micro_batches": state["nonfinite_loss_micro_batches"],
                    **throughput(window_tokens, max(elapsed, 1e-9), flops_per_token, info.world_size, peak),
                    # Wall time per step, everything in the loop included (RL sources also split theirs into parts).
                    "time/step_s": elapsed / window_steps,
                    **result.metrics,
                }
                if not result.skipped:
                    record.update(runner.router_metrics)
                metrics.log(state["step"], last_loss, record)
                if progress is not None:
                    # RL sources report a reward per prompt type (reward/plain, reward/round1, ...) and, under a
                    # compute budget, the share of it used: a step count alone does not say when the run ends.
                    extra = {k.removeprefix("reward/"): f"{v:.2f}" for k, v in result.metrics.items()
                             if k.startswith("reward/") and not k.startswith("reward/env/")}
                    if "compute/budget_fraction" in result.metrics:
                        extra["budget"] = f"{100 * result.metrics['compute/budget_fraction']:.0f}%"
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                         tok_s=f"{record['throughput/tokens_per_s']:.0f}", **extra)
                window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
            if progress is not None:
                progress.update(1)

            stopping = _any_rank(stop.received is not None, info.device)
            if stopping or state["step"] % cfg.trainer.save_interval == 0 or state["step"] == cfg.trainer.max_steps:
                _save(run_dir, cfg, engine, state, source, balancer, info)
                saved_step = state["step"]
            if stopping:
                reason = f"signal {signal.Signals(stop.received).name if stop.received else 'on another rank'}"
                break
        if reason in ("max_steps", source.exhausted_reason):
            source.finish(engine, state["step"], last_loss, metrics, info)
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
    if on_finish is not None:
        on_finish(engine)
    # No rank leaves while another may still be in a collective (gloo aborts a peer whose partner is gone).
    dist.barrier()
    if info.rank == 0:
        log.info("stopped at step %d (%s), last loss %.4f", state["step"], reason, last_loss)
    return {"step": state["step"], "loss": last_loss, "reason": reason}


def _evaluate(cfg: RunConfig, engine, tokenizer, step: int, loss: float, metrics: MetricsSink, info: DistInfo) -> None:
    if cfg.deepspeed.zero_stage == 3:
        log.info("end-of-run evaluation skipped: ZeRO-3 partitions the weights (export, then evaluate)")
        return
    if info.rank == 0:
        from zaya_train.train.evaluate import evaluate_chain_sum

        results = evaluate_chain_sum(engine.module, tokenizer, cfg.trainer.eval_problems, seed=cfg.seed)
        metrics.log(step, loss, {**results, "event": "eval"})
        log.info("held-out chain sums: greedy accuracy %.3f, temperature-1 accuracy %.3f",
                 results["eval/greedy_accuracy"], results["eval/sampled_accuracy"])


def _save(run_dir: Path, cfg: RunConfig, engine, state: dict[str, Any], source: BatchSource, balancer,
          info: DistInfo) -> None:
    if not _weights_finite(engine):
        log.error("step %d: weights are not finite; not writing a checkpoint", state["step"])
        return
    trainer_state = {
        **state,
        "model_config": dataclasses.asdict(engine.module.config),
        "world_size": info.world_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
    ckpt.save_checkpoint(
        run_dir, state["step"], engine, trainer_state, source.state_dict(), balancer.state_dict(), cfg.trainer.keep_last
    )
