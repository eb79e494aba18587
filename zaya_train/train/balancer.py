"""The expert-bias balancer (ZAYA1-8B report, arXiv 2605.05365, eq. 5): an AdamW on the routers' balancing biases whose "gradient" is
each layer's expert-load error over the global batch.

    from zaya_train.train.balancer import BalancerConfig, ExpertBiasBalancer
    balancer = ExpertBiasBalancer(model.routers(), BalancerConfig(lr=1e-3))
    for micro_batch in accumulation_window:
        out = model(...); out.loss.backward()
        balancer.accumulate(out.tokens_per_expert)      # [L, E+1] counts of real tokens, skip class last
    optimizer.step()
    metrics = balancer.step()                            # all-reduce, one bias update, per-layer load metrics
    checkpoint["balancer"] = balancer.state_dict()

Per layer l and real expert e, with c_{l,e} the tokens routed to e summed over the accumulation window and
all-reduced over the data-parallel group:

    p_{l,e} = c_{l,e} / sum_e' c_{l,e'}        (e' over the E real experts)
    grad b_{l,e} = p_{l,e} - 1/E                (over-loaded experts are pushed down, under-loaded pulled up)

The skip class (index E) is neither in the denominator nor updated: its bias is initialised to -1, which keeps
it from ever winning the argmax over prob + bias (p_skip - 1 <= 0 <= p_e + b_e while the expert biases stay
near 0); a balancing target for it would pull it up toward 1/E and start dropping tokens, which is why the report
([I] in 4.3) excludes it. Its routing rate is still reported (`skip_rate`).

The AdamW (fp32 moments, no weight decay, bias-corrected) updates an fp32 master copy [L, E] of the biases and
writes it to the router buffers after every step, so bf16 buffers (a model cast to bf16) never lose the small
updates. If a buffer was changed from outside (a model checkpoint loaded after the balancer was built), the
master re-reads it first. The main optimizer never sees the biases: they are buffers, not parameters.

Metrics (`step()` returns them, prefixed `router/`): per layer `layer{l}/load_entropy` = H(p)/ln E (1 =
uniform), `layer{l}/max_load` and `layer{l}/min_load` = E * max_e p_e and E * min_e p_e (loads relative to
uniform: 1 = exactly uniform, E = every token to one expert, 0 = an idle expert), `layer{l}/skip_rate` = the
fraction of real tokens sent to the skip class; aggregates `load_entropy_mean`, `load_entropy_min`,
`max_load_max`, `min_load_min`, `skip_rate_mean`, and `tokens` (real tokens per layer in the global batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class BalancerConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"BalancerConfig.lr must be > 0, got {self.lr!r}")
        if not self.eps > 0:
            raise ValueError(f"BalancerConfig.eps must be > 0, got {self.eps!r}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ValueError(f"BalancerConfig.{key} must be in [0, 1), got {value!r}")


class ExpertBiasBalancer:
    """Updates the `balancing_biases` buffers [E+1] of `routers` once per optimizer step from accumulated
    per-class token counts. `process_group` is the data-parallel group (default: the world, when
    torch.distributed is initialised; no reduction otherwise). Build it once the model sits on its device
    (e.g. after `deepspeed.initialize`): the fp32 master and the counts live on the buffers' device."""

    def __init__(
        self,
        routers: Sequence[nn.Module],
        config: BalancerConfig,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not routers:
            raise ValueError("ExpertBiasBalancer needs at least one router")
        sizes = {router.balancing_biases.numel() for router in routers}
        if len(sizes) != 1 or min(sizes) < 2:
            raise ValueError(
                f"routers' balancing_biases must share one size E+1 >= 2, got sizes {sorted(sizes)}"
            )
        self.routers = list(routers)
        self.config = config
        self.process_group = process_group
        self.num_layers = len(self.routers)
        self.num_experts = sizes.pop() - 1
        device = self.routers[0].balancing_biases.device
        self.bias_LE = torch.stack(
            [r.balancing_biases[: self.num_experts].float() for r in self.routers]
        ).clone()
        self.optimizer = torch.optim.AdamW(
            [self.bias_LE], lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=0.0
        )
        self.counts_LX = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.int64, device=device)
        self.num_accumulated = 0

    def accumulate(self, tokens_per_expert_LX: torch.Tensor) -> None:
        """Adds one micro-batch's counts [L, E+1] (the forward's `tokens_per_expert`)."""
        if tuple(tokens_per_expert_LX.shape) != tuple(self.counts_LX.shape):
            raise ValueError(
                f"tokens_per_expert has shape {tuple(tokens_per_expert_LX.shape)}, expected {tuple(self.counts_LX.shape)}"
            )
        self.counts_LX += tokens_per_expert_LX.detach().to(self.counts_LX.device, torch.int64)
        self.num_accumulated += 1

    @torch.no_grad()
    def step(self, update_biases: bool = True) -> dict[str, float]:
        """All-reduces the accumulated counts, updates the biases once (unless `update_biases` is False: RL keeps
        the rollout policy's routing fixed), resets the counts; returns the metrics."""
        if self.num_accumulated == 0:
            raise RuntimeError("ExpertBiasBalancer.step() called with no accumulate() since the last step")
        counts_LX = self.counts_LX
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(counts_LX, op=dist.ReduceOp.SUM, group=self.process_group)
        routed_LE = counts_LX[:, : self.num_experts].double()
        total_L1 = routed_LE.sum(dim=1, keepdim=True)
        load_LE = routed_LE / total_L1.clamp_min(1)
        # A layer that routed no token to any expert has no load signal: give it a zero error, not -1/E.
        error_LE = torch.where(total_L1 > 0, load_LE - 1 / self.num_experts, 0.0)

        if update_biases:
            self._resync_from_buffers()
            self.bias_LE.grad = error_LE.to(self.bias_LE)
            self.optimizer.step()
            self.bias_LE.grad = None
            self._write_buffers()

        metrics = self._metrics(counts_LX, load_LE)
        self.reset()
        return metrics

    def reset(self) -> None:
        """Drops the counts accumulated since the last step (a skipped optimizer step updates no bias)."""
        self.counts_LX.zero_()
        self.num_accumulated = 0

    def _resync_from_buffers(self) -> None:
        for layer, router in enumerate(self.routers):
            buffer_E = router.balancing_biases[: self.num_experts]
            if not torch.equal(buffer_E, self.bias_LE[layer].to(buffer_E.dtype)):
                self.bias_LE[layer].copy_(buffer_E)

    def _write_buffers(self) -> None:
        for layer, router in enumerate(self.routers):
            router.balancing_biases[: self.num_experts].copy_(self.bias_LE[layer])

    def _metrics(self, counts_LX: torch.Tensor, load_LE: torch.Tensor) -> dict[str, float]:
        num_experts = self.num_experts
        neg_plogp_LE = torch.where(load_LE > 0, -load_LE * load_LE.clamp_min(1e-300).log(), 0.0)
        entropy_L = (neg_plogp_LE.sum(dim=1) / math.log(num_experts)).tolist()
        max_load_L = (load_LE.max(dim=1).values * num_experts).tolist()
        min_load_L = (load_LE.min(dim=1).values * num_experts).tolist()
        tokens_L = counts_LX.sum(dim=1)
        skip_rate_L = (counts_LX[:, num_experts].double() / tokens_L.clamp_min(1)).tolist()
        metrics: dict[str, float] = {}
        for layer in range(self.num_layers):
            metrics[f"router/layer{layer}/load_entropy"] = entropy_L[layer]
            metrics[f"router/layer{layer}/max_load"] = max_load_L[layer]
            metrics[f"router/layer{layer}/min_load"] = min_load_L[layer]
            metrics[f"router/layer{layer}/skip_rate"] = skip_rate_L[layer]
        metrics["router/load_entropy_mean"] = sum(entropy_L) / self.num_layers
        metrics["router/load_entropy_min"] = min(entropy_L)
        metrics["router/max_load_max"] = max(max_load_L)
        metrics["router/min_load_min"] = min(min_load_L)
        metrics["router/skip_rate_mean"] = sum(skip_rate_L) / self.num_layers
        metrics["router/tokens"] = float(tokens_L[0])
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"biases": self.bias_LE.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        biases = state_dict["biases"]
        if tuple(biases.shape) != tuple(self.bias_LE.shape):
            raise ValueError(
                f"balancer state has biases of shape {tuple(biases.shape)}, this model needs {tuple(self.bias_LE.shape)}"
            )
        with torch.no_grad():
            self.bias_LE.copy_(biases)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._write_buffers()
