"""Process group and DeepSpeed engine set-up: one launch form for 1 or N processes.

    zaya-train recipe=pretrain ...                                   # one process
    torchrun --nproc_per_node=8 -m zaya_train recipe=pretrain ...    # N processes (torchrun sets RANK etc.)

gloo on CPU; nccl on GPU (RCCL on ROCm). bf16 on GPU and fp32 on CPU unless `deepspeed.precision` says
otherwise. Under ZeRO-3 the CCA projection (whose forward reads its two convolutions' weights to compose them)
and the MoE block are ZeRO-3 leaf modules: their whole parameter set is gathered when they run, on every rank,
whatever the routing, so data-dependent expert choice cannot leave one rank waiting on a fetch the others skip.
The experts are two 3-D parameters of one module, so every rank runs the same module calls in any case.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from zaya_train.model import ZayaForCausalLM
from zaya_train.model.cca import ZayaCCAProjection
from zaya_train.model.moe import ZayaSparseMoeBlock
from zaya_train.train.allocator import keep_freed_memory
from zaya_train.train.config import ConfigError, RunConfig
from zaya_train.train.optim import OptimConfig, build_optimizer, parameter_kinds
from zaya_train.train.schedule import build_scheduler


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Joins the torchrun process group, or forms a group of one for a plain `zaya-train` process. The group
    lives as long as the process: the jobs of a sweep (-m) run one after another in it (DeepSpeed keeps
    references to the group, so it cannot be torn down and rebuilt between jobs)."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
        keep_freed_memory()
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    precision = cfg.deepspeed.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def deepspeed_config(cfg: RunConfig, dtype: torch.dtype, load_universal: bool) -> dict[str, Any]:
    ds = cfg.deepspeed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        # At stage 0 NonFiniteGuard clips (and reports the norm); ZeRO optimizers clip themselves.
        "gradient_clipping": ds.gradient_clipping if ds.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": ds.zero_stage},
        # A non-finite gradient norm makes DeepSpeed's ZeRO optimizers skip the step (counted in skipped_steps).
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "checkpoint": {"load_universal": load_universal},
    }
    return _merge(config, dict(ds.extra))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


class NonFiniteGuard(torch.optim.Optimizer):
    """Wraps the client optimizer at ZeRO stage 0, where no DeepSpeed ZeRO optimizer catches overflow: it clips
    the gradients to `max_norm` (DeepSpeed's own clipping is turned off there, as it does not report the norm),
    records the norm, and skips a step whose gradients hold a NaN or Inf, clearing them. The gradients are
    already all-reduced when it runs, so every rank takes the same decision."""

    def __init__(self, inner: torch.optim.Optimizer, max_norm: float) -> None:
        self.inner = inner
        self.max_norm = max_norm
        self.skipped = 0
        self.last_grad_norm = float("nan")
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.defaults = inner.defaults

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.last_grad_norm = float(norm)
        if not torch.isfinite(norm):
            self.skipped += 1
            self.inner.zero_grad(set_to_none=True)
            return None
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state


def deepspeed_muon(model: ZayaForCausalLM, optim: OptimConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Param groups and the `optimizer` config entry for DeepSpeed's own Muon, which runs inside ZeRO 1-3 and
    the bf16 optimizer (where a client Muon would only see flat partitions).

    Every parameter is tagged `use_muon` (hidden and expert matrices) or not (AdamW: embeddings, conv kernels,
    vectors). DeepSpeed's Muon scales its update by sqrt(max(1, out/in)) (Keller Jordan's rule), which is
    `muon_adjust_lr="original"`; for the default "match_rms_adamw" each matrix shape gets its own group whose lr
    is multiplied by f = 0.2 * sqrt(max(out, in)) / sqrt(max(1, out/in)), Moonlight's update-RMS matching as
    `torch.optim.Muon` does at stage 0. DeepSpeed decays weights by lr * weight_decay, torch by the unadjusted
    lr * weight_decay, so the group's weight decay is divided by the same f. DeepSpeed's Muon always runs 5
    Newton-Schulz steps with Nesterov momentum: other `muon_ns_steps` / `muon_nesterov` are refused."""
    for key, value, supported in (("muon_ns_steps", optim.muon_ns_steps, 5), ("muon_nesterov", optim.muon_nesterov, True)):
        if value != supported:
            raise ConfigError(
                f"optim.{key}: DeepSpeed's Muon (ZeRO 1-3 or bf16) only runs {key}={supported}, got {value}; "
                "use deepspeed.zero_stage=0 in fp32 for torch's Muon"
            )
    kinds = parameter_kinds(model)
    params = dict(model.named_parameters())
    muon_groups: dict[tuple[int, int], list[torch.nn.Parameter]] = {}
    decayed, not_decayed = [], []
    for name, kind in kinds.items():
        param = params[name]
        param.use_muon = kind in ("matrix", "expert")
        if param.use_muon:
            muon_groups.setdefault(tuple(param.shape[-2:]), []).append(param)
        elif kind == "vector":
            not_decayed.append(param)
        else:
            decayed.append(param)
    groups: list[dict[str, Any]] = []
    for (rows, cols), members in sorted(muon_groups.items()):
        to_moonlight = 1.0
        if optim.muon_adjust_lr == "match_rms_adamw":
            to_moonlight = 0.2 * math.sqrt(max(rows, cols)) / math.sqrt(max(1.0, rows / cols))
        groups.append({"params": members, "lr": optim.resolved_muon_lr * to_moonlight,
                       "weight_decay": optim.resolved_muon_weight_decay / to_moonlight, "name": f"muon_{rows}x{cols}"})
    groups.append({"params": decayed, "weight_decay": optim.weight_decay, "name": "adamw"})
    groups.append({"params": not_decayed, "weight_decay": 0.0, "name": "adamw_no_decay"})
    config = {
        "type": "Muon",
        "params": {"lr": optim.lr, "momentum": optim.muon_momentum, "betas": [optim.beta1, optim.beta2],
                   "eps": optim.eps, "weight_decay": optim.weight_decay, "torch_adam": True},
    }
    return [g for g in groups if g["params"]], config


def build_engine(model: ZayaForCausalLM, cfg: RunConfig, dtype: torch.dtype, load_universal: bool = False):
    """Returns (engine, lr_scheduler). The balancing biases stay fp32 buffers whatever the compute dtype.

    Optimizers: AdamW, or the Muon/AdamW split. Muon at stage 0 in fp32 is `torch.optim.Muon` (a client
    optimizer, each expert matrix orthogonalised alone); under ZeRO 1-3 or bf16 it is DeepSpeed's own Muon."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    zero_stage = cfg.deepspeed.zero_stage
    if zero_stage == 3:
        set_z3_leaf_modules(model, [ZayaCCAProjection, ZayaSparseMoeBlock])
    ds_config = deepspeed_config(cfg, dtype, load_universal)
    if cfg.optim.name == "muon" and (zero_stage > 0 or dtype != torch.float32):
        params, ds_config["optimizer"] = deepspeed_muon(model, cfg.optim)
        # DeepSpeed orthogonalises Muon gradients before it computes the norm it clips by, so clipping would
        # shrink every orthogonalised update (norm ~ sqrt(rows) per matrix) to a fraction of itself.
        ds_config["gradient_clipping"] = 0.0
        # ZeRO-3's Muon orthogonalises whole gathered gradients, which DeepSpeed cannot combine with reduce-scatter.
        ds_config["zero_optimization"]["reduce_scatter"] = False
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, cfg.schedule),
        )
    else:
        optimizer = build_optimizer(model, cfg.optim)
        if zero_stage == 0:
            optimizer = NonFiniteGuard(optimizer, cfg.deepspeed.gradient_clipping)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.schedule), config=ds_config
        )
    for router in engine.module.routers():
        router.balancing_biases = router.balancing_biases.float()
    if dist.get_world_size() == 1 and zero_stage == 0:
        # Alone at stage 0, DeepSpeed would still flatten, "all-reduce" and unflatten every gradient each step.
        # (ZeRO optimizers gather their gradient partitions through that path: it stays on for them.)
        engine.enable_backward_allreduce = False
    return engine, scheduler


def skipped_steps(engine) -> int:
    if isinstance(engine.optimizer, NonFiniteGuard):
        return engine.optimizer.skipped
    return int(engine.skipped_steps)


def grad_norm(engine) -> float:
    """The global gradient norm of the last optimizer step (before clipping)."""
    if isinstance(engine.optimizer, NonFiniteGuard):
        return engine.optimizer.last_grad_norm
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)
