"""`rl.shared_prompt_forward`: running each distinct prompt once and the responses on its copied cache rows gives
the full-row forward's logprobs, routing and gradients."""

from types import SimpleNamespace

import pytest
import torch

from zaya_train.loading import load_model
from zaya_train.rl.config import RLConfig
from zaya_train.rl.loop import RLSource, RowBatch
from zaya_train.rl.shared_prompts import shared_prompt_forward
from zaya_train.rollout import RolloutEngine
from zaya_train.train.engine import DistInfo

GROUP = 3
RETAGGED_ROW = 4  # same prompt tokens as its group, another recorded expert on a prompt token


@pytest.fixture(scope="module")
def rollouts(policy):
    model = load_model(policy).eval()
    generator = torch.Generator().manual_seed(0)
    # Three groups of prompts of different lengths (left padding in the shared prefill), responses of different
    # lengths (right padding) through an EOS-free engine with per-row budgets.
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (4, 7, 5)]
    prompt_rows = [p for p in prompts for _ in range(GROUP)]
    budgets = [9, 12, 6, 11, 12, 3, 12, 8, 10]
    results = RolloutEngine(model).generate(prompt_rows, max_new_tokens=budgets, seed=0, eos_token_id=[])
    rows = [(SimpleNamespace(prompt_ids=p, token_ids=r.token_ids, logprobs=r.logprobs, expert_ids=r.expert_ids.clone()),
             0.0) for p, r in zip(prompt_rows, results)]
    ids_SL = rows[RETAGGED_ROW][0].expert_ids
    ids_SL[1, 0] = (ids_SL[1, 0] + 1) % model.config.num_experts
    return model, RowBatch(rows, pad_id=0, num_layers=model.config.num_hidden_layers, device=torch.device("cpu"))


def test_rows_share_a_prompt_only_with_the_same_tokens_and_recorded_routing(rollouts):
    _, batch = rollouts
    assert batch.prompt_of == [0, 0, 0, 1, 2, 1, 3, 3, 3]
    assert batch.repeats_prompts
    subset = batch.select(torch.tensor([False, True, False, True, False, False, True, True, False]))
    assert subset.prompt_of == [0, 1, 2, 2] and subset.prompt_lens == [4, 7, 5, 5]


@pytest.mark.parametrize("replay", [True, False])
def test_shared_prompt_forward_equals_the_full_row_forward(rollouts, replay):
    model, batch = rollouts
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(batch.input_ids, labels=batch.labels, expert_ids=batch.expert_ids if replay else None,
                 return_logits=False, return_logprobs=True, return_expert_ids=True)
    shared = shared_prompt_forward(model, model.config, batch, replay, temperature=1.0, pad_id=0)
    model.eval()

    assert shared.logprobs.shape == full.logprobs.shape
    scored = batch.mask
    assert torch.allclose(shared.logprobs[scored], full.logprobs[scored], atol=1e-5)
    assert bool((shared.logprobs[~scored] == 0).all())
    for name in ("expert_ids", "router_ids"):
        assert torch.equal(getattr(shared, name)[batch.real], getattr(full, name)[batch.real])
    if replay:  # the retagged prompt token's routing is what this row replays, not its group's
        assert torch.equal(shared.expert_ids[batch.real], batch.expert_ids[batch.real])

    weights_BS = torch.randn(scored.shape, generator=torch.Generator().manual_seed(1)) * scored
    grads_full = torch.autograd.grad((full.logprobs * weights_BS).sum(), params, allow_unused=True)
    grads_shared = torch.autograd.grad((shared.logprobs * weights_BS).sum(), params, allow_unused=True)
    for param, a, b in zip(params, grads_full, grads_shared):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).norm() <= 1e-4 * a.norm() + 1e-7, [n for n, p in model.named_parameters() if p is param]


def test_the_loop_takes_the_shared_path_only_where_prompts_repeat(rollouts):
    model, batch = rollouts
    source = object.__new__(RLSource)
    source.rl, source.info = RLConfig(shared_prompt_forward=True), DistInfo(0, 1, 0, torch.device("cpu"))
    source.sync = SimpleNamespace(partitioned=False)
    source.tokenizer = SimpleNamespace(pad_token_id=0)
    rows_seen: list[int] = []

    def engine(input_ids, **kwargs):
        rows_seen.append(len(input_ids))
        return model(input_ids, **kwargs)

    source.engine = type("Engine", (), {"module": model, "__call__": staticmethod(engine)})()
    with torch.no_grad():
        source._forward(batch, replay=True)
        assert rows_seen == [4, 9]  # the 4 distinct prompts, then the 9 responses
        rows_seen.clear()
        source._forward(batch.select(torch.arange(9) % GROUP == 0), replay=True)  # one row per prompt
        assert rows_seen == [3]
        rows_seen.clear()
        source.sync.partitioned = True  # ZeRO-3: one (collective) forward per micro-batch
        source._forward(batch, replay=True)
        assert rows_seen == [9]
