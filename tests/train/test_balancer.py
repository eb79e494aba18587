"""The expert-bias balancer: hand-computed first updates, accumulation, balancing a skewed router, checkpoint
state, bf16 buffers, and the data-parallel all-reduce over two gloo processes.

    pytest tests/train/test_balancer.py
"""

import io
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.train.balancer import BalancerConfig, ExpertBiasBalancer
from zaya_train.train.optim import OptimConfig, build_optimizer

LR = 0.01


class FakeRouter(nn.Module):
    """Just the buffer the balancer drives: 4 experts + the skip class at -1."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("balancing_biases", torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0], dtype=dtype))


def biases(routers):
    return torch.stack([r.balancing_biases.float() for r in routers])


def test_first_update_and_metrics_by_hand():
    routers = [FakeRouter(), FakeRouter()]
    balancer = ExpertBiasBalancer(routers, BalancerConfig(lr=LR))
    balancer.accumulate(torch.tensor([[6, 2, 0, 0, 3], [2, 2, 2, 2, 0]]))
    metrics = balancer.step()
    # Layer 0: loads (6, 2, 0, 0) / 8 -> errors (0.5, 0, -0.25, -0.25). A first Adam step moves each bias by
    # lr * g / (|g| + eps), i.e. -lr, 0, +lr, +lr. Layer 1 is balanced: no error, no move. Skip stays at -1.
    expected = torch.tensor([[-LR, 0.0, LR, LR, -1.0], [0.0, 0.0, 0.0, 0.0, -1.0]])
    torch.testing.assert_close(biases(routers), expected, atol=1e-9, rtol=0)
    # H(0.75, 0.25) / ln 4 = (0.75 ln(4/3) + 0.25 ln 4) / ln 4 = 0.40563906222956...
    entropy0 = (0.75 * math.log(4 / 3) + 0.25 * math.log(4)) / math.log(4)
    assert metrics["router/layer0/load_entropy"] == pytest.approx(entropy0)
    assert metrics["router/layer0/max_load"] == pytest.approx(3.0)  # 0.75 of the tokens, 4x uniform
    assert metrics["router/layer0/min_load"] == 0.0
    assert metrics["router/layer0/skip_rate"] == pytest.approx(3 / 11)
    assert metrics["router/layer1/load_entropy"] == pytest.approx(1.0)
    assert metrics["router/layer1/max_load"] == metrics["router/layer1/min_load"] == pytest.approx(1.0)
    assert metrics["router/load_entropy_mean"] == pytest.approx((entropy0 + 1) / 2)
    assert metrics["router/load_entropy_min"] == pytest.approx(entropy0)
    assert metrics["router/max_load_max"] == pytest.approx(3.0)
    assert metrics["router/min_load_min"] == 0.0
    assert metrics["router/skip_rate_mean"] == pytest.approx(3 / 22)
    assert metrics["router/tokens"] == 11


def test_micro_batches_accumulate_into_one_update():
    routers = [FakeRouter()]
    balancer = ExpertBiasBalancer(routers, BalancerConfig(lr=LR))
    balancer.accumulate(torch.tensor([[4, 2, 0, 0, 1]]))
    balancer.accumulate(torch.tensor([[2, 0, 0, 0, 2]]))
    assert torch.equal(biases(routers), torch.tensor([[0.0, 0.0, 0.0, 0.0, -1.0]]))  # nothing until step()
    metrics = balancer.step()
    # Summed (6, 2, 0, 0): the errors and the single Adam step of the test above.
    torch.testing.assert_close(biases(routers), torch.tensor([[-LR, 0.0, LR, LR, -1.0]]), atol=1e-9, rtol=0)
    assert metrics["router/tokens"] == 11
    with pytest.raises(RuntimeError, match="no accumulate"):
        balancer.step()


def skewed_nano_model() -> ZayaForCausalLM:
    """Two layers whose routers send nearly every token to expert 0: router MLP weights of unit gain (so the
    routing depends on the token), and expert 0's logit row shifted by +0.3 per latent unit."""
    torch.manual_seed(0)
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2)).eval()
    with torch.no_grad():
        for router in model.routers():
            mlp = router.router_mlp
            for linear in (mlp.fc1, mlp.fc2, mlp.out_proj):
                linear.weight.normal_(0, 1 / math.sqrt(linear.in_features))
            mlp.out_proj.weight[0] += 0.3
    return model


@torch.no_grad()
def test_balancer_spreads_a_skewed_router():
    model = skewed_nano_model()
    balancer = ExpertBiasBalancer(model.routers(), BalancerConfig(lr=0.02))
    generator = torch.Generator().manual_seed(1)
    entropies = []
    for _ in range(40):
        ids = torch.randint(3, model.config.vocab_size, (4, 64), generator=generator)
        balancer.accumulate(model(ids).tokens_per_expert)
        entropies.append(balancer.step()["router/load_entropy_mean"])
    assert entropies[0] < 0.5
    assert sum(entropies[-5:]) / 5 > 0.9
    final = biases(model.routers())
    assert (final[:, 0] < 0).all() and (final[:, 1:4] > 0).all()  # the favourite pushed down, the rest up
    assert (final[:, 4] == -1).all()


def test_main_optimizer_never_sees_the_balancing_biases():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2, moe_intermediate_size=32))
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    bias_ptrs = {router.balancing_biases.data_ptr() for router in model.routers()}
    assert not bias_ptrs & {p.data_ptr() for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for router in model.routers():
            router.balancing_biases[:4] = 0.5
    before = biases(model.routers())
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert torch.equal(biases(model.routers()), before)


def test_state_round_trip():
    counts = [
        torch.tensor([[5, 1, 1, 1, 0]]),
        torch.tensor([[1, 5, 1, 1, 1]]),
        torch.tensor([[3, 3, 1, 1, 0]]),
    ]
    routers = [FakeRouter()]
    balancer = ExpertBiasBalancer(routers, BalancerConfig(lr=LR))
    for c in counts:
        balancer.accumulate(c)
        balancer.step()
    stream = io.BytesIO()
    torch.save(balancer.state_dict(), stream)
    stream.seek(0)
    resumed_routers = [FakeRouter()]
    resumed = ExpertBiasBalancer(resumed_routers, BalancerConfig(lr=LR))
    resumed.load_state_dict(torch.load(stream, weights_only=True))
    assert torch.equal(biases(resumed_routers), biases(routers))
    for b in (balancer, resumed):
        b.accumulate(torch.tensor([[0, 0, 4, 4, 0]]))
        b.step()
    assert torch.equal(biases(resumed_routers), biases(routers))
    with pytest.raises(ValueError, match="shape"):
        ExpertBiasBalancer([FakeRouter(), FakeRouter()], BalancerConfig()).load_state_dict(
            balancer.state_dict()
        )


def test_bf16_buffers_keep_the_fp32_master_and_outside_changes_are_read():
    router = FakeRouter(torch.bfloat16)
    router.balancing_biases[0] = 0.5
    balancer = ExpertBiasBalancer([router], BalancerConfig(lr=1e-3))
    for _ in range(10):
        balancer.accumulate(torch.tensor([[5, 1, 1, 1, 0]]))
        balancer.step()
    # A constant error makes every Adam step exactly lr (bias-corrected moments equal g and g^2): 0.5 - 10e-3.
    # In bf16 (spacing 2^-9 near 0.49) a single 1e-3 step rounds away; the fp32 master keeps all ten.
    assert balancer.bias_LE[0, 0].item() == pytest.approx(0.49, abs=1e-6)
    assert router.balancing_biases[0].item() == torch.tensor(0.49).bfloat16().item()
    router.balancing_biases[1] = 0.25  # e.g. a model checkpoint loaded after the balancer was built
    balancer.accumulate(
        torch.tensor([[2, 2, 2, 2, 0]])
    )  # zero error; Adam's momentum still moves it a little
    balancer.step()
    assert abs(router.balancing_biases[1].item() - 0.25) < 2e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        routers = [FakeRouter()]
        balancer = ExpertBiasBalancer(routers, BalancerConfig(lr=LR))
        balancer.accumulate(torch.tensor([[6, 2, 0, 0, 1]]) if rank == 0 else torch.tensor([[2, 2, 4, 0, 0]]))
        metrics = balancer.step()
        torch.save({"biases": biases(routers), "tokens": metrics["router/tokens"]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_counts_are_all_reduced_across_data_parallel_ranks(tmp_path):
    mp.spawn(_all_reduce_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    # Global counts (8, 4, 4, 0) -> errors (0.25, 0, 0, -0.25) -> biases (-lr, 0, 0, +lr) on both ranks. Rank 0's
    # own counts alone, (6, 2, 0, 0), would have given (-lr, 0, +lr, +lr).
    expected = torch.tensor([[-LR, 0.0, 0.0, LR, -1.0]])
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["biases"], expected, atol=1e-9, rtol=0)
        assert result["tokens"] == 17
