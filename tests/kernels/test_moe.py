"""The Triton MoE expert kernels, run by the Triton interpreter on the CPU, equal the model's PyTorch path
(`ZayaExperts.forward` with kernels="torch") and HF's per-expert loop (`reference_experts`): the output and the
gradients of x, the routing weight, gate_up and down, in fp32, at sizes that are not block multiples (37 tokens,
D 24, F 20 in 16-wide tiles), with an expert that gets no tokens, skip-class tokens, one expert and several;
and the permutation kernels equal a stable argsort and the cumulative bincount. fp32 only: Triton 3.9's
interpreter multiplies bf16 tl.dot operands wrongly (compiled kernels are right), so bf16 is a GPU check
(benchmarks/kernels.py prints the largest difference to the torch path)."""

import importlib

import pytest
import torch

from zaya_train.model import preset
from zaya_train.model.moe import ZayaExperts, reference_experts

# 16-wide tiles (tl.dot's smallest on a GPU) leave partial tiles in every dimension; 16-token permutation
# blocks over 37 tokens make three blocks, so the scan carries counts across blocks.
TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_T": 16}


@pytest.fixture(scope="module")
def moe(interpret):
    return importlib.import_module("zaya_train.kernels.moe")


def make_experts(num_experts: int, hidden: int = 24, ffn: int = 20, seed: int = 0) -> ZayaExperts:
    config = preset("nano", hidden_size=hidden, moe_intermediate_size=ffn, num_experts=num_experts,
                    kernels="torch")
    experts = ZayaExperts(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.3)
    return experts


def routing(num_tokens: int, num_experts: int, empty: int | None, seed: int = 0):
    """ids in [0, E] (E: the skip class) with expert `empty` never chosen, and weights in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts + 1, (num_tokens,), generator=g)
    if empty is not None:
        ids[ids == empty] = (empty + 1) % (num_experts + 1)
    ids[:2] = num_experts  # skip-class tokens, whatever the draw
    return ids, torch.rand(num_tokens, generator=g)


def run(fn, experts: ZayaExperts, x, ids, weight, upstream):
    """fn's output and the gradients of sum(output * upstream) w.r.t. x, weight, gate_up and down."""
    x = x.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    experts.zero_grad()
    out = fn(x, ids, weight)
    (out * upstream).sum().backward()
    return out.detach(), {"x": x.grad, "weight": weight.grad, "gate_up": experts.gate_up_proj.grad.clone(),
                          "down": experts.down_proj.grad.clone()}


@pytest.mark.parametrize(("num_experts", "empty"), [(1, None), (4, 2), (3, 0)],
                         ids=["one_expert", "four_one_empty", "three_expert0_empty"])
def test_moe_experts_match_torch_path_and_hf_loop(moe, num_experts, empty):
    experts = make_experts(num_experts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 24, generator=g)
    upstream = torch.randn(37, 24, generator=g)
    ids, weight = routing(37, num_experts, empty)

    def kernel(x, ids, weight):
        return moe.moe_experts(x, ids, weight, experts.gate_up_proj, experts.down_proj, TILES)

    got, got_grads = run(kernel, experts, x, ids, weight, upstream)
    torch_path, torch_grads = run(experts, experts, x, ids, weight, upstream)
    hf, hf_grads = run(lambda *a: reference_experts(experts, *a), experts, x, ids, weight, upstream)
    for name, want, want_grads in (("torch path", torch_path, torch_grads), ("HF loop", hf, hf_grads)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"output vs {name}")
        for grad in got_grads:
            torch.testing.assert_close(got_grads[grad], want_grads[grad], atol=1e-5, rtol=1e-5,
                                       msg=f"d {grad} vs {name}")
    skip = ids == num_experts
    assert (got[skip] == 0).all() and (got_grads["weight"][skip] == 0).all() and (got_grads["x"][skip] == 0).all()
    if empty is not None:
        assert (got_grads["gate_up"][empty] == 0).all() and (got_grads["down"][empty] == 0).all()
    with torch.no_grad():  # the forward-only path saves nothing for a backward
        torch.testing.assert_close(kernel(x, ids, weight), torch_path, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_experts", [1, 4, 5])
def test_permute_matches_stable_argsort_and_bincount(moe, num_experts):
    ids, _ = routing(37, num_experts, empty=num_experts - 1 if num_experts > 1 else None, seed=num_experts)
    order, offsets = moe.permute(ids, num_experts, {"BLOCK_T": 16})
    routed = ids.masked_fill(ids == num_experts, 0)
    assert torch.equal(order.long(), torch.argsort(routed, stable=True))
    counts = torch.bincount(routed, minlength=num_experts)
    assert torch.equal(offsets.long(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
