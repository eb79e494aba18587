"""Grouped expert dispatch equals HF's per-expert loop in outputs and gradients."""

import pytest
import torch

from zaya_train.kernels import linear as kernels_linear
from zaya_train.model import preset
from zaya_train.model.moe import ZayaExperts, reference_experts


def run(experts, fn, x, ids, weight):
    x = x.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = fn(experts, x, ids, weight) if fn is reference_experts else experts(x, ids, weight)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), x.grad, weight.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


@pytest.mark.parametrize("backend", ["onednn", "grouped_mm", "per_expert_gemm"])
def test_dispatch_matches_reference(backend, monkeypatch):
    if backend == "onednn":
        monkeypatch.setattr(kernels_linear, "ONEDNN_MIN_MACS", 0)
        monkeypatch.setattr(kernels_linear, "cpu_gemm_route", lambda: "onednn")
    else:
        monkeypatch.setattr(kernels_linear, "uses_onednn", lambda *_: False)
    if backend == "per_expert_gemm":
        monkeypatch.setattr(kernels_linear, "grouped_mm_supported", lambda *_: False)
    config = preset("nano", num_experts=5, hidden_size=32, moe_intermediate_size=48)
    experts = ZayaExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    ids = torch.randint(0, config.num_experts + 1, (70,))  # includes the skip class (id 5)
    ids[:4] = 3  # expert 3 used, expert 1 unused
    ids[ids == 1] = 0
    x = torch.randn(70, 32)
    weight = torch.rand(70)
    ours = run(experts, None, x, ids, weight)
    ref = run(experts, reference_experts, x, ids, weight)
    for name, a, b in zip(["out", "x.grad", "weight.grad", "gate_up.grad", "down.grad"], ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert (ours[0][ids == config.num_experts] == 0).all(), "skip-class tokens produce zero"
