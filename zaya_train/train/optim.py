"""Parameter grouping and the main optimizer: plain AdamW, or ZAYA1's Muon + AdamW split (ZAYA1-8B report,
arXiv 2605.05365).

    from zaya_train.train.optim import OptimConfig, build_optimizer, group_parameters
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=3e-4))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)   # ZeRO stage 0 only
    groups = group_parameters(model, config)     # {"muon": [(name, p), ...], "adamw": [...], "adamw_no_decay": [...]}

Which parameter goes where (`parameter_kinds` names each parameter's kind, `group_parameters` applies the rule):

    kind       parameters                                              name="muon"        name="adamw"
    matrix     2-D nn.Linear weights: CCA q/k/v/o projections,          muon               adamw
               router down_proj, router MLP fc1/fc2/out_proj
    expert     gate_up_proj [E, 2F, D], down_proj [E, D, F]             muon, per expert   adamw
    embedding  the token embedding (and the LM head when tied)          adamw              adamw
    lm_head    an untied LM head                                        adamw              adamw
    conv       CCA kernels conv_qk_depthwise [C, 1, T0],                adamw              adamw
               conv_qk_grouped [C, d, T1]
    vector     every 1-D parameter: norms, biases, residual scales      adamw_no_decay     adamw_no_decay
               and biases, temp, router_states_scale

- Expert weights get Muon per expert: `ExpertMuon` is `torch.optim.Muon` that treats a 3-D [E, out, in]
  parameter as E independent [out, in] matrices (each expert is its own linear map, so orthogonalising the
  stacked [E*out, in] matrix would couple experts that never see the same tokens). Each slice gets its own
  Newton-Schulz iteration and its own learning-rate adjustment from its [out, in] shape.
- Conv kernels stay on AdamW: the depthwise kernel is one scalar per channel and tap (no matrix to
  orthogonalise), and the grouped kernel is a handful of taps of small per-head [d, d] blocks; Muon is only
  established for hidden-layer matrices, and these kernels hold well under 1% of the parameters.
- Muon uses the Moonlight update-RMS matching (`adjust_lr_fn="match_rms_adamw"`: lr * 0.2 * sqrt(max(out, in))),
  so its updates have AdamW's RMS and `muon_lr` can default to AdamW's `lr` and weight decay.
- The routers' `balancing_biases` are buffers, so no main optimizer ever sees them (`balancer.py` owns them).

DeepSpeed (checked with deepspeed 0.19.8, a client optimizer passed to `deepspeed.initialize`):

- ZeRO stage 0 (fp32, or bf16 through DeepSpeed's FP16_UnfusedOptimizer, which keeps one fp32 master per
  parameter with its shape): the optimizer sees whole parameters, Muon is exact.
- ZeRO stages 1 and 2: DeepSpeed flattens each param group into one 1-D fp32 partition per rank and hands only
  that to the client optimizer, so no optimizer step can see a whole matrix. Stage 3 partitions the parameters
  themselves. A client Muon is therefore only built for stage 0 in fp32; everywhere else the trainer runs
  DeepSpeed's own config-driven Muon (`optimizer.type="muon"`, parameters tagged `use_muon`), which gathers
  whole gradients inside ZeRO, with per-shape learning rates that turn its update scaling into the Moonlight
  rule (`zaya_train.train.engine.deepspeed_muon`). AdamW works as a client optimizer at every stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zaya_train.model.moe import ZayaExperts

OPTIMIZERS = ("adamw", "muon")
MUON_LR_ADJUSTMENTS = ("match_rms_adamw", "original")
GROUPS = ("muon", "adamw", "adamw_no_decay")


@dataclass
class OptimConfig:
    """The main optimizer. `lr` is the peak AdamW learning rate (a schedule scales it); `muon_lr` defaults to it."""

    name: str = "muon"
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_lr: float | None = None
    muon_weight_decay: float | None = None
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "match_rms_adamw"

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimConfig.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.muon_adjust_lr not in MUON_LR_ADJUSTMENTS:
            raise ValueError(
                f"OptimConfig.muon_adjust_lr must be one of {MUON_LR_ADJUSTMENTS}, got {self.muon_adjust_lr!r}"
            )
        for key in ("lr", "weight_decay", "eps", "muon_lr", "muon_weight_decay", "muon_momentum"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ValueError(f"OptimConfig.{key} must be >= 0, got {value!r}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ValueError(f"OptimConfig.{key} must be in [0, 1), got {value!r}")
        if (
            isinstance(self.muon_ns_steps, bool)
            or not isinstance(self.muon_ns_steps, int)
            or self.muon_ns_steps <= 0
        ):
            raise ValueError(
                f"OptimConfig.muon_ns_steps must be a positive integer, got {self.muon_ns_steps!r}"
            )

    @property
    def resolved_muon_lr(self) -> float:
        return self.lr if self.muon_lr is None else self.muon_lr

    @property
    def resolved_muon_weight_decay(self) -> float:
        return self.weight_decay if self.muon_weight_decay is None else self.muon_weight_decay


# ---------------------------------------------------------------------------------------------------------------
# Grouping


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """The kind (a row of the module table) of every trainable parameter, by name; a tied parameter is listed once, under
    its first name. Raises ValueError for a parameter no rule covers, so a new module gets a deliberate choice."""
    output_head = getattr(model, "lm_head", None)
    kinds: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            if param.ndim <= 1:
                kind = "vector"
            elif isinstance(module, nn.Embedding):
                kind = "embedding"
            elif isinstance(module, nn.Linear):
                kind = "lm_head" if module is output_head else "matrix"
            elif isinstance(module, ZayaExperts):
                kind = "expert"
            elif isinstance(module, nn.Conv1d):
                kind = "conv"
            else:
                raise ValueError(
                    f"no optimizer rule for parameter {name!r} of shape {tuple(param.shape)} in "
                    f"{type(module).__name__}; add one to zaya_train.train.optim.parameter_kinds"
                )
            kinds[name] = kind
    return kinds


def group_parameters(model: nn.Module, config: OptimConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters per group (`GROUPS`): `muon` (empty unless `config.name == "muon"`), `adamw` (decayed),
    `adamw_no_decay` (norms, biases, scales: decaying them would pull gains toward 0, not toward simplicity)."""
    kinds = parameter_kinds(model)
    params = dict(model.named_parameters())
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {group: [] for group in GROUPS}
    for name, kind in kinds.items():
        if kind == "vector":
            group = "adamw_no_decay"
        elif kind in ("matrix", "expert") and config.name == "muon":
            group = "muon"
        else:
            group = "adamw"
        groups[group].append((name, params[name]))
    return groups


# ---------------------------------------------------------------------------------------------------------------
# Optimizers


class ExpertMuon(torch.optim.Muon):
    """`torch.optim.Muon` that also takes 3-D [E, out, in] parameters, updated as E independent [out, in]
    matrices: each slice gets torch's own momentum, Newton-Schulz and `adjust_lr_fn` math (the slices are views,
    so the in-place updates land in the parameter and in its [E, out, in] momentum buffer)."""

    def __init__(self, params: Iterable[Any], **muon_kwargs: Any) -> None:
        # Muon's constructor rejects 3-D parameters, so borrow its argument checks and defaults from a stand-in
        # and register the real parameters through the base Optimizer.
        defaults = torch.optim.Muon([torch.zeros(1, 1)], **muon_kwargs).defaults
        torch.optim.Optimizer.__init__(self, params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"ExpertMuon takes 2-D or 3-D [E, out, in] parameters, got shape {tuple(p.shape)}"
                    )

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs) -> bool:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.ndim not in (2, 3):
                raise RuntimeError(
                    f"ExpertMuon got a parameter of shape {tuple(p.shape)} at step time: something (DeepSpeed ZeRO "
                    "stage >= 1 does this) replaced the model's matrices by flat partitions; Muon needs whole matrices"
                )
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            if p.ndim == 2:
                params_with_grad.append(p)
                grads.append(p.grad)
                muon_momentum_bufs.append(buf)
            else:
                params_with_grad.extend(p.unbind(0))
                grads.extend(p.grad.unbind(0))
                muon_momentum_bufs.extend(buf.unbind(0))
        return False


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer object over an `ExpertMuon` and a `torch.optim.AdamW` (what `deepspeed.initialize` and
    `LambdaLR` expect). Its `param_groups` are the inner optimizers' group dicts themselves and its `state` is
    shared with both, so a scheduler setting `lr` or DeepSpeed swapping in fp32 master copies reaches them."""

    def __init__(self, muon: ExpertMuon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._link_inner()

    def _link_inner(self) -> None:
        num_muon = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:num_muon]
        self.adamw.param_groups = self.param_groups[num_muon:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The base class rebuilds `param_groups` and `state` as new objects; point the inner optimizers at them.
        super().load_state_dict(state_dict)
        self._link_inner()


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The main optimizer for `model` as a client optimizer with whole parameters (AdamW, or `MuonAdamW` for
    `name="muon"`, which needs ZeRO stage 0); every group carries a `name` key (one of `GROUPS`) for logging."""
    groups = group_parameters(model, config)
    betas = (config.beta1, config.beta2)
    adamw_groups = [
        {"params": [p for _, p in groups[name]], "name": name, "weight_decay": decay}
        for name, decay in (("adamw", config.weight_decay), ("adamw_no_decay", 0.0))
        if groups[name]
    ]
    adamw = torch.optim.AdamW(adamw_groups, lr=config.lr, betas=betas, eps=config.eps)
    if config.name == "adamw":
        return adamw
    muon = ExpertMuon(
        [{"params": [p for _, p in groups["muon"]], "name": "muon"}],
        lr=config.resolved_muon_lr,
        weight_decay=config.resolved_muon_weight_decay,
        momentum=config.muon_momentum,
        nesterov=config.muon_nesterov,
        ns_steps=config.muon_ns_steps,
        adjust_lr_fn=config.muon_adjust_lr,
    )
    return MuonAdamW(muon, adamw)
