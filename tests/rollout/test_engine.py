"""RolloutEngine against teacher-forced full forwards (no cache): greedy tokens, log-probabilities, recorded
routing, continuous batching, EOS/stop handling, weight loading and input validation.

    pytest tests/rollout -q -s      # -s shows the measured logprob differences
"""

import pytest
import torch

from tests.rollout.reference import prompts, randomized_model, reference_greedy, teacher_forced
from zaya_train.hf import save_pretrained
from zaya_train.rollout import RolloutEngine


@pytest.fixture(scope="module")
def model():
    return randomized_model(0)


@pytest.fixture(scope="module")
def engine(model):
    return RolloutEngine(model)


def test_greedy_equals_argmax_of_full_forward(engine, model):
    batch = prompts([4, 11, 7])
    results = engine.generate(batch, max_new_tokens=10, temperature=0, eos_token_id=[])
    for prompt, result in zip(batch, results):
        logits_NV, _ = teacher_forced(model, prompt, result.token_ids)
        assert len(result.token_ids) == 10 and result.finish_reason == "length"
        assert result.token_ids == logits_NV.argmax(-1).tolist()


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.8, 6)])
def test_logprobs_are_the_temperature_scaled_full_forward(engine, model, temperature, top_p, top_k):
    batch = prompts([5, 9, 3, 12], seed=2)
    results = engine.generate(
        batch, max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k, seed=7, max_batch_size=3,
        eos_token_id=[],
    )
    worst = 0.0
    for prompt, result in zip(batch, results):
        logits_NV, _ = teacher_forced(model, prompt, result.token_ids)
        logprobs_NV = (logits_NV / temperature).log_softmax(-1)
        tokens_N = torch.tensor(result.token_ids)
        want_N = logprobs_NV.gather(-1, tokens_N[:, None]).squeeze(-1)
        worst = max(worst, (torch.tensor(result.logprobs) - want_N).abs().max().item())
        # Every sampled token lies inside the top-k / top-p set of the reference distribution.
        sorted_NV, order_NV = logprobs_NV.exp().sort(-1, descending=True)
        rank_N = (order_NV == tokens_N[:, None]).int().argmax(-1)
        mass_before_N = (sorted_NV.cumsum(-1) - sorted_NV).gather(-1, rank_N[:, None]).squeeze(-1)
        if top_k:
            assert (rank_N < top_k).all()
        assert (mass_before_N < top_p + 1e-5).all()
    print(f"\nT={temperature} top_p={top_p} top_k={top_k}: max |engine logprob - full forward| = {worst:.2e}")
    assert worst <= 1e-4


def test_expert_ids_equal_teacher_forced_routing(engine, model):
    batch = prompts([6, 2, 10], seed=3)
    results = engine.generate(
        batch, max_new_tokens=[9, 5, 7], temperature=1.0, seed=1, max_batch_size=2, eos_token_id=[]
    )
    for prompt, result in zip(batch, results):
        _, expert_ids_SL = teacher_forced(model, prompt, result.token_ids)
        assert result.expert_ids.shape == (len(prompt) + len(result.token_ids), model.config.num_hidden_layers)
        assert torch.equal(result.expert_ids, expert_ids_SL)
        # Not degenerate: several classes (skip included or not) are in use.
        assert expert_ids_SL.unique().numel() > 1


def test_seeded_sampling_is_reproducible(engine):
    batch = prompts([3, 8, 5, 6, 2], seed=4)

    def run(seed, size):
        return [r.token_ids for r in engine.generate(batch, 15, temperature=1.0, seed=seed, max_batch_size=size)]

    first = run(11, 5)
    assert run(11, 5) == first
    assert run(12, 5) != first
    # Per-request generators: the batch composition does not change what a request samples.
    assert run(11, 2) == first


def test_continuous_batching_equals_requests_run_alone(engine, model):
    lengths, budgets = [7, 3, 12, 5, 9], [6, 11, 4, 8, 3]
    batch = prompts(lengths, seed=5)
    decode_rows = []
    step = engine.decode_step

    def spy(tokens_B, positions_B, cache):
        decode_rows.append(tokens_B.shape[0])
        return step(tokens_B, positions_B, cache)

    engine.decode_step = spy
    try:
        results = engine.generate(batch, max_new_tokens=budgets, temperature=0, eos_token_id=[], max_batch_size=2)
    finally:
        engine.decode_step = step
    for prompt, budget, result in zip(batch, budgets, results):
        assert result.token_ids == reference_greedy(model, prompt, budget)
    assert max(decode_rows) == 2
    # Each generated token is fed exactly once (the last one only to record its routing): finished rows cost nothing.
    assert sum(decode_rows) == sum(budgets)


def test_identical_prompts_are_prefilled_once_and_sampled_apart(engine, model, monkeypatch):
    first, second = prompts([6, 9], seed=6)
    batch = [first, second, first, first, second]
    prefill_rows = []
    forward = model.forward

    def spy(ids_BS, *args, **kwargs):
        prefill_rows.append(ids_BS.shape[0])
        return forward(ids_BS, *args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    results = engine.generate(batch, max_new_tokens=8, temperature=1.0, seed=3, eos_token_id=[])
    monkeypatch.undo()
    assert prefill_rows == [2]
    assert len({tuple(r.token_ids) for r in results[:1] + results[2:4]}) > 1, "a group's samples differ"
    for prompt, result in zip(batch, results):
        logits_NV, expert_ids_SL = teacher_forced(model, prompt, result.token_ids)
        want_N = logits_NV.log_softmax(-1).gather(-1, torch.tensor(result.token_ids)[:, None]).squeeze(-1)
        assert (torch.tensor(result.logprobs) - want_N).abs().max() <= 1e-4
        assert torch.equal(result.expert_ids, expert_ids_SL)


def test_eos_and_stop_sequences_end_a_request(engine, model):
    (prompt,) = prompts([6], seed=6)
    free = reference_greedy(model, prompt, 12)
    eos = free[4]
    cut = free.index(eos) + 1
    (result,) = engine.generate([prompt], 12, temperature=0, eos_token_id=[63, eos])
    assert (result.token_ids, result.finish_reason) == (free[:cut], "eos")
    assert len(result.logprobs) == result.expert_ids.shape[0] - len(prompt) == cut

    stop = free[5:7]
    end = next(i + 2 for i in range(len(free) - 1) if free[i : i + 2] == stop)
    (result,) = engine.generate([prompt], 12, temperature=0, eos_token_id=[], stop_sequences=[[0, 0, 0], stop])
    assert (result.token_ids, result.finish_reason) == (free[:end], "stop")


def test_load_weights_and_from_pretrained(engine, model, tmp_path):
    other = randomized_model(1)
    batch = prompts([5, 8], seed=7)
    fresh = RolloutEngine(randomized_model(0))
    fresh.load_weights(other)
    results = fresh.generate(batch, 6, temperature=0, eos_token_id=[])
    assert [r.token_ids for r in results] == [reference_greedy(other, p, 6) for p in batch]
    # A tied lm_head may be absent from the state dict, as in HF exports.
    fresh.load_weights({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    assert [r.token_ids for r in fresh.generate(batch, 6, temperature=0, eos_token_id=[])] == [
        reference_greedy(model, p, 6) for p in batch
    ]
    with pytest.raises(ValueError, match="state_dict_or_model"):
        fresh.load_weights({"model.norm.weight": torch.ones(3)})

    loaded = RolloutEngine.from_pretrained(save_pretrained(other, tmp_path / "hf"))
    assert [r.token_ids for r in loaded.generate(batch, 6, temperature=0, eos_token_id=[])] == [
        reference_greedy(other, p, 6) for p in batch
    ]


def test_live_model_trained_in_place_then_reloaded():
    model = randomized_model(0)
    engine = RolloutEngine(model)
    batch = prompts([5, 8], seed=7)
    engine.generate(batch, 6, temperature=0, eos_token_id=[])  # builds the fused and rearranged weights
    other = randomized_model(1)
    with torch.no_grad():
        for source, target in zip(other.state_dict().values(), model.state_dict().values()):
            target.data.copy_(source)  # as an optimizer writing through .data: no version bump
    engine.load_weights(model)
    for prompt, result in zip(batch, engine.generate(batch, 6, temperature=1.0, seed=3, eos_token_id=[])):
        logits_NV, _ = teacher_forced(other, prompt, result.token_ids)  # with autograd on: nothing cached
        expected_N = logits_NV.log_softmax(-1).gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.logprobs), expected_N, atol=1e-4, rtol=0)


def test_zero3_partitioned_weights_decode_through_the_general_forward(engine, model, monkeypatch):
    batch = prompts([4, 9], seed=8)
    expected = [r.token_ids for r in engine.generate(batch, 5, temperature=0, eos_token_id=[])]
    monkeypatch.setattr(model.lm_head.weight, "ds_id", 0, raising=False)  # what ZeRO-3 marks its parameters with
    monkeypatch.setattr(engine, "decode_step", lambda *args: pytest.fail("DecodeStep cannot gather ZeRO-3 weights"))
    assert [r.token_ids for r in engine.generate(batch, 5, temperature=0, eos_token_id=[])] == expected


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompt_ids=[[5, 6], []]), "prompt_ids"),
        (dict(prompt_ids=[]), "prompt_ids"),
        (dict(prompt_ids=[[5, 64]]), "prompt_ids"),
        (dict(prompt_ids=[[5, -1]]), "prompt_ids"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=[3]), "max_new_tokens"),
        (dict(max_new_tokens=5000), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(eos_token_id=64), "eos_token_id"),
        (dict(stop_sequences=[[]]), "stop_sequences"),
        (dict(max_batch_size=0), "max_batch_size"),
    ],
)
def test_bad_input_raises_value_error_naming_it(engine, kwargs, name):
    args = dict(prompt_ids=[[5, 6], [7]], max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=name):
        engine.generate(**args)
