"""The single-token decode step equals transformers' full forward at every generated position (left-padded and
unpadded rows, a sliding window narrower than the context, experts run densely and through the grouped
dispatch) and picks up in-place weight updates."""

import pytest
import torch

from tests.model.hf_reference import ours_from_hf, randomized_hf_model
from tests.model.test_cache import CONFIG, positions
from tests.model.test_parity import left_padded_batch
from zaya_train.model import ZayaCache, preset
from zaya_train.model import decode as decode_module
from zaya_train.model.decode import DecodeStep


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = preset("nano", **CONFIG)
    hf_model = randomized_hf_model(config, bias_std=0.0)
    with torch.no_grad():
        hf_model.model.layers[2].mlp.gate.balancing_biases[-1] = 10.0  # every token skips the last layer's experts
    return hf_model, ours_from_hf(config, hf_model)


@torch.no_grad()
def decode(model, prompt, mask, continuation):
    """Prefill through the forward, then feed `continuation` one token per step; logits and router ids per step."""
    cache = ZayaCache(model.config, initial_capacity=4)  # the key buffers grow while decoding
    model(prompt, attention_mask=mask, position_ids=positions(mask), cache=cache)
    step = DecodeStep(model)
    position_B = positions(mask)[:, -1] + 1
    logits, expert_ids = [], []
    for token_B in continuation.unbind(1):
        logits_BV, ids_BL = step(token_B, position_B, cache)
        logits.append(logits_BV)
        expert_ids.append(ids_BL)
        position_B = position_B + 1
    return torch.stack(logits, dim=1), torch.stack(expert_ids, dim=1), cache


@pytest.mark.parametrize("lengths", [[4, 9, 6], [9, 9, 9]], ids=["left_padded", "unpadded"])
@pytest.mark.parametrize("dense", [True, False], ids=["dense_experts", "grouped_experts"])
def test_decode_step_equals_full_forward(models, dense, lengths, monkeypatch):
    monkeypatch.setattr(decode_module, "DENSE_EXPERT_MACS_PER_EXPERT", 2**40 if dense else 0)
    hf_model, model = models
    assert DecodeStep(model).dense_experts(3) is dense
    prompt, mask = left_padded_batch(model.config.vocab_size, lengths)
    continuation = torch.randint(3, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    logits, expert_ids, cache = decode(model, prompt, mask, continuation)

    full_ids = torch.cat([prompt, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    with torch.no_grad():
        expected = hf_model(full_ids, attention_mask=full_mask, position_ids=positions(full_mask)).logits
        routed = model(full_ids, attention_mask=full_mask, position_ids=positions(full_mask), return_expert_ids=True)
    width = prompt.shape[1]
    torch.testing.assert_close(logits, expected[:, width:], atol=1e-4, rtol=0)
    assert torch.equal(expert_ids, routed.expert_ids[:, width:])
    assert (expert_ids[..., 2] == model.config.num_experts).all(), "the skip class is exercised"
    assert len(expert_ids[..., :2].unique()) > 1, "tokens route to different classes"
    assert cache.get_seq_length() == full_ids.shape[1]
    if full_mask.all():
        assert cache.key_valid is None
    else:
        assert torch.equal(cache.key_valid, full_mask.bool())


def cache_after_prefill(model, prompt, mask):
    cache = ZayaCache(model.config)
    model(prompt, attention_mask=mask, position_ids=positions(mask), cache=cache)
    return cache


@torch.no_grad()
def test_decode_step_follows_in_place_weight_updates(models):
    hf_model, trained = models
    model = ours_from_hf(trained.config, hf_model)  # a copy this test may change
    prompt, mask = left_padded_batch(model.config.vocab_size, [5, 7])
    step = DecodeStep(model)
    token_B, position_B = prompt[:, -1], positions(mask)[:, -1] + 1
    before = step(token_B, position_B, cache_after_prefill(model, prompt, mask))[0]
    model.model.layers[0].self_attn.qkv_proj.conv_qk_grouped.weight.mul_(2.0)
    model.model.layers[1].mlp.experts.gate_up_proj.mul_(2.0)
    after = step(token_B, position_B, cache_after_prefill(model, prompt, mask))[0]
    cache = cache_after_prefill(model, prompt, mask)
    reference = model(token_B[:, None], position_ids=position_B[:, None], cache=cache).logits[:, -1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=0)
    # Only a residual merge's parameters: the decode step keeps their constant term between updates.
    model.model.layers[1].post_mlp_residual_scale.residual_bias.add_(0.5)
    after = step(token_B, position_B, cache_after_prefill(model, prompt, mask))[0]
    cache = cache_after_prefill(model, prompt, mask)
    reference = model(token_B[:, None], position_ids=position_B[:, None], cache=cache).logits[:, -1]
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_invalidate_picks_up_writes_the_version_counters_miss(models):
    hf_model, trained = models
    model = ours_from_hf(trained.config, hf_model)
    prompt, mask = left_padded_batch(model.config.vocab_size, [5, 7])
    step = DecodeStep(model)
    token_B, position_B = prompt[:, -1], positions(mask)[:, -1] + 1
    step(token_B, position_B, cache_after_prefill(model, prompt, mask))
    model.model.layers[0].self_attn.qkv_proj.q_proj.weight.data.mul_(2.0)  # .data: no version bump
    model.model.layers[1].mlp.experts.down_proj.data.mul_(2.0)
    step.invalidate()
    after = step(token_B, position_B, cache_after_prefill(model, prompt, mask))[0]
    cache = cache_after_prefill(model, prompt, mask)
    reference = model(token_B[:, None], position_ids=position_B[:, None], cache=cache).logits[:, -1]
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=0)


def test_decode_step_needs_a_prefilled_cache(models):
    _, model = models
    with pytest.raises(ValueError, match="prompt"):
        DecodeStep(model)(torch.tensor([3]), torch.tensor([0]), ZayaCache(model.config))
