"""The pretrain / midtrain / SFT loop on a DeepSpeed engine.

    zaya-train recipe=pretrain data.path=corpus.jsonl run_dir=runs/p1 trainer.max_steps=1000
    torchrun --nproc_per_node=2 -m zaya_train recipe=nano deepspeed.zero_stage=2

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
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from zaya_train.train.engine import DistInfo, build_engine, grad_norm, init_distributed, resolve_dtype, skipped_steps
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


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """One all-reduce for several per-step numbers."""
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _weights_finite(engine) -> bool:
    local = all(bool(torch.isfinite(p.detach()).all()) for p in engine.module.parameters() if p.numel() > 0)
    return not _any_rank(not local, next(engine.module.parameters()).device)


def _initial_model(cfg: RunConfig, model_config) -> ZayaForCausalLM:
    if cfg.model.init_from is None:
        return ZayaForCausalLM(model_config)
    model = load_model(cfg.model.init_from, gradient_checkpointing=model_config.gradient_checkpointing)
    if model.config.vocab_size != model_config.vocab_size:
        raise ConfigError(
            f"model.init_from: {cfg.model.init_from} has vocab_size {model.config.vocab_size}, the tokenizer needs "
            f"{model_config.vocab_size}"
        )
    return model


def train(cfg: RunConfig, run_dir: Path, on_finish: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Runs the configured training; returns a summary (final step, last loss, why it stopped). `on_finish` is
    called with the DeepSpeed engine once training ends (e.g. to inspect or export the live model)."""
    info: DistInfo = init_distributed()
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.rank == 0:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")

    data = build_training_data(cfg.data, run_dir, cfg.seed, info.rank)
    tokenizer = data.tokenizer
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
    engine, scheduler = build_engine(model, cfg, dtype, load_universal=universal)
    balancer = ExpertBiasBalancer(engine.module.routers(), cfg.balancer)
    loader = PackedLoader(
        data.windows,
        LoaderConfig(micro_batch_size=cfg.data.micro_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                     num_epochs=cfg.data.num_epochs),
        rank=info.rank, world_size=info.world_size,
    )
    state = {"step": 0, "nonfinite_loss_micro_batches": 0, "skipped_steps": 0, "tokens": 0}
    if resume_from is not None:
        trainer_state, data_state, balancer_state = ckpt.load_checkpoint(resume_from, engine, universal)
        loader.load_state_dict(data_state)
        balancer.load_state_dict(balancer_state)
        state.update({k: trainer_state[k] for k in state})
        if info.rank == 0:
            log.info("resumed from %s at step %d", resume_from, state["step"])

    stop = _StopSignal()
    flops_per_token = model_flops_per_token(model_config, cfg.data.seq_len)
    peak = peak_flops(info.device, cfg.trainer.peak_flops)
    metrics = MetricsSink(run_dir, cfg.wandb, info.rank, run_config=cfg)
    if data.stats and info.rank == 0:
        metrics.log(state["step"], float("nan"), {**data.stats, "event": "data"})
    progress = None
    if info.rank == 0 and cfg.trainer.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.trainer.max_steps, initial=state["step"], desc="train", dynamic_ncols=True)

    batches = iter(loader)
    gas = cfg.deepspeed.gradient_accumulation_steps
    in_row = 0
    reason = "max_steps"
    saved_step = state["step"]
    last_loss = float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while state["step"] < cfg.trainer.max_steps:
            losses, step_tokens, counted, exhausted = [], 0, False, False
            skipped_before = skipped_steps(engine)
            for _ in range(gas):
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
                out = engine(
                    batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"], return_logits=False
                )
                step_tokens += batch["input_ids"].numel()
                finite = not _any_rank(not bool(torch.isfinite(out.loss)), info.device)
                # A non-finite micro-batch still runs its backward and engine.step(), with its loss zeroed:
                # DeepSpeed finds the accumulation boundary (and ZeRO flushes its gradient buckets) by counting
                # them. Its gradient is zero, or non-finite where its activations are, and then the optimizer
                # skips the whole step.
                engine.backward(out.loss if finite else out.loss * 0.0)
                engine.step()
                if not finite:
                    state["nonfinite_loss_micro_batches"] += 1
                    continue
                balancer.accumulate(out.tokens_per_expert)
                losses.append(out.loss.detach().float().item())
                counted = True
            if exhausted:
                reason = "data_exhausted"
                if saved_step != state["step"]:
                    _save(run_dir, cfg, engine, state, loader, balancer, info)
                break
            step_skipped = not counted or skipped_steps(engine) > skipped_before
            state["step"] += 1
            tokens_all, loss_sum, loss_count = _sum_over_ranks([step_tokens, sum(losses), len(losses)], info.device)
            state["tokens"] += int(tokens_all)
            window_tokens += int(tokens_all)
            last_loss = loss_sum / loss_count if loss_count else float("nan")
            if step_skipped:
                state["skipped_steps"] += 1
                in_row += 1
                if balancer.num_accumulated:
                    balancer.reset()
                if in_row >= cfg.trainer.max_nonfinite_in_row:
                    raise TrainingDiverged(
                        f"{in_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                        f"{state['step']}); stopping. Lower optim.lr, check the data, or resume from the last checkpoint."
                    )
            else:
                in_row = 0
                router_metrics = balancer.step()

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
                }
                if not step_skipped:
                    record.update(router_metrics)
                metrics.log(state["step"], last_loss, record)
                if progress is not None:
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                         tok_s=f"{record['throughput/tokens_per_s']:.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)

            stopping = _any_rank(stop.received is not None, info.device)
            if stopping or state["step"] % cfg.trainer.save_interval == 0 or state["step"] == cfg.trainer.max_steps:
                _save(run_dir, cfg, engine, state, loader, balancer, info)
                saved_step = state["step"]
            if stopping:
                reason = f"signal {signal.Signals(stop.received).name if stop.received else 'on another rank'}"
                break
        if reason in ("max_steps", "data_exhausted") and cfg.data.kind == "chain_sum" and cfg.trainer.eval_problems:
            _evaluate(cfg, engine, tokenizer, state["step"], last_loss, metrics, info)
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


def _save(run_dir: Path, cfg: RunConfig, engine, state: dict[str, Any], loader, balancer, info: DistInfo) -> None:
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
        run_dir, state["step"], engine, trainer_state, loader.state_dict(), balancer.state_dict(), cfg.trainer.keep_last
    )
