"""The rollout engine with its decode step compiled (`RolloutEngine(model, compile=True)`, `rl.compile_decode`)
against teacher-forced full forwards without a cache: the same logprobs up to float rounding and the same routing,
one compiled graph for a whole generate call while its rows finish one by one, and in-place weight updates
followed without compiling again."""

import pytest
import torch
from torch._dynamo.utils import counters

from tests.rollout.reference import prompts, randomized_model, teacher_forced
from zaya_train.rollout import RolloutEngine


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """inductor's on-disk caches under this run's temporary directory (its default is shared by every run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield
    torch._dynamo.reset()


def assert_matches_full_forward(model, batch, results, temperature) -> float:
    worst = 0.0
    for prompt, result in zip(batch, results):
        logits_NV, expert_ids_PL = teacher_forced(model, prompt, result.token_ids)
        want_N = (logits_NV / temperature).log_softmax(-1).gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
        worst = max(worst, (torch.tensor(result.logprobs) - want_N).abs().max().item())
        assert torch.equal(result.expert_ids, expert_ids_PL)
    assert worst <= 1e-4
    return worst


@torch.no_grad()
def test_compiled_decode_step_generates_what_the_full_forward_computes():
    model = randomized_model(3)
    engine = RolloutEngine(model, compile=True)
    # Left-padded prompts (key masks, a sliding-window layer), rows that finish at different steps down to a lone
    # row (which runs eager), and temperature sampling. 32 rows, as many as the head dim: a rearranged weight's
    # dim of the same size must not pin the batch size (the first row to finish would compile again).
    batch = prompts([3 + i % 10 for i in range(32)], seed=4)
    budgets = [3 + i % 12 for i in range(31)] + [16]
    graphs = counters["stats"]["unique_graphs"]
    results = engine.generate(batch, max_new_tokens=budgets, temperature=0.8, seed=11, eos_token_id=[])
    assert [len(r.token_ids) for r in results] == budgets
    worst = assert_matches_full_forward(model, batch, results, 0.8)
    assert counters["stats"]["unique_graphs"] - graphs == 1, "one graph for every batch size and key length"

    for param in (model.model.layers[0].self_attn.qkv_proj.q_proj.weight, model.model.layers[2].mlp.experts.down_proj):
        param.mul_(1.5)  # an optimizer-like in-place update: its version counter moves
    graphs = counters["stats"]["unique_graphs"]
    results = engine.generate(batch, max_new_tokens=budgets, temperature=0.8, seed=12, eos_token_id=[])
    worst = max(worst, assert_matches_full_forward(model, batch, results, 0.8))
    unpadded = prompts([6] * 4, seed=5)  # no key mask needed: the step passes an all-zero one
    results = engine.generate(unpadded, max_new_tokens=8, temperature=0.8, seed=13, eos_token_id=[])
    worst = max(worst, assert_matches_full_forward(model, unpadded, results, 0.8))
    assert counters["stats"]["unique_graphs"] == graphs, "new weights and unpadded prompts, no new graph"
    print(f"\ncompiled decode: max |engine logprob - full forward| = {worst:.2e}")


@torch.no_grad()
def test_compiled_and_eager_engines_sample_the_same_tokens():
    model = randomized_model(5)
    batch = prompts([4, 8, 6], seed=6)
    kwargs = {"max_new_tokens": 10, "temperature": 1.0, "seed": 3, "eos_token_id": []}
    eager = RolloutEngine(model).generate(batch, **kwargs)
    compiled = RolloutEngine(model, compile=True).generate(batch, **kwargs)
    for a, b in zip(eager, compiled):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.expert_ids, b.expert_ids)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
