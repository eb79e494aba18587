"""The ZAYA1 router (ZAYA1-8B report, arXiv 2605.05365, eqs. 1-5): an MLP over a depth-averaged (EDA) latent, top-1 over E experts
plus a skip class, selected on probability + balancing bias, weighted by the unbiased probability.

The balancing biases are a buffer: no optimizer touches them; the trainer's balancer updates them from the
per-expert token counts this module reports. Routing can be replayed: given the expert id of every token
(as a rollout recorded them), the router uses those ids instead of its argmax, so a policy update trains on
exactly the experts the rollout used.

Shape suffixes: B batch, S sequence, D hidden, R router latent, E routed experts, X router classes (E + 1).
"""

from __future__ import annotations

import torch
from torch import nn

from zaya_train.model.config import ZayaConfig
from zaya_train.model.layers import Linear, ZayaRMSNorm


class ZayaRouterMLP(nn.Module):
    def __init__(self, hidden_size: int, num_classes: int, eps: float) -> None:
        super().__init__()
        self.norm = ZayaRMSNorm(hidden_size, eps)
        self.fc1 = Linear(hidden_size, hidden_size)
        self.fc2 = Linear(hidden_size, hidden_size)
        self.out_proj = Linear(hidden_size, num_classes, bias=False)
        self.act = nn.GELU()

    def forward(self, r_BSR: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.act(self.fc2(self.act(self.fc1(self.norm(r_BSR))))))


class ZayaRouter(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.down_proj = Linear(config.hidden_size, config.router_hidden_size)
        # The first layer has no previous router state, hence no EDA scale (as in HF's checkpoints).
        self.use_eda = layer_idx != 0
        if self.use_eda:
            self.router_states_scale = nn.Parameter(torch.ones(config.router_hidden_size))
        self.router_mlp = ZayaRouterMLP(config.router_hidden_size, config.num_router_classes, config.rms_norm_eps)
        biases = torch.zeros(config.num_router_classes, dtype=torch.float32)
        biases[-1] = -1.0
        self.register_buffer("balancing_biases", biases)

    def forward(
        self, x_BSD: torch.Tensor, prev_state_BSR: torch.Tensor | None, replay_ids_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (class id per token [B,S] in 0..E, where E is skip; its unbiased probability [B,S] fp32;
        the router state for the next layer [B,S,R]; the class the router itself picks [B,S], which differs from
        the first only where a replayed id overrides it)."""
        r_BSR = self.down_proj(x_BSD)
        if self.use_eda and prev_state_BSR is not None:
            r_BSR = r_BSR + prev_state_BSR * self.router_states_scale
        probs_BSX = torch.softmax(self.router_mlp(r_BSR).float(), dim=-1)
        own_ids_BS = (probs_BSX.detach() + self.balancing_biases).argmax(dim=-1)
        ids_BS = own_ids_BS if replay_ids_BS is None else replay_ids_BS.to(device=x_BSD.device, dtype=torch.long)
        weight_BS = probs_BSX.gather(-1, ids_BS[..., None]).squeeze(-1)
        return ids_BS, weight_BS, r_BSR, own_ids_BS
