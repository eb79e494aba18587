"""Decode cache: batched prefill of left-padded prompts then token-by-token decode equals the full forward, and
greedy tokens equal transformers' `generate` on the same weights."""

import pytest
import torch

from tests.model.hf_reference import ours_from_hf, randomized_hf_model
from tests.model.test_parity import left_padded_batch
from zaya_train.model import ZayaCache, preset

CONFIG = dict(
    num_hidden_layers=3, attention_bias=True, cca_time0=3, cca_time1=2,
    layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=5,
)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = preset("nano", **CONFIG)
    hf_model = randomized_hf_model(config, std=0.1)
    return hf_model, ours_from_hf(config, hf_model)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def test_cached_decode_equals_full_forward(models):
    _, model = models
    prompt, mask = left_padded_batch(model.config.vocab_size, [4, 9, 6])
    continuation = torch.randint(3, model.config.vocab_size, (3, 8))
    full_ids = torch.cat([prompt, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    full = model(full_ids, attention_mask=full_mask, position_ids=positions(full_mask)).logits

    cache = ZayaCache(model.config, initial_capacity=4)  # forces the buffers to grow while decoding
    out = model(prompt, attention_mask=mask, position_ids=positions(mask), cache=cache)
    step_logits = [out.logits[:, -1]]
    # One chunk of 3 tokens (chunked prefill), then single tokens.
    chunks = [continuation[:, :3]] + [continuation[:, i : i + 1] for i in range(3, 8)]
    for chunk in chunks:
        start = cache.get_seq_length()
        pos = positions(full_mask)[:, start : start + chunk.shape[1]]
        out = model(chunk, position_ids=pos, cache=cache)
        step_logits.extend(out.logits.unbind(1))
    cached = torch.stack(step_logits, dim=1)
    expected = full[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_cache_select_drops_rows(models):
    _, model = models
    prompt, mask = left_padded_batch(model.config.vocab_size, [5, 8, 3])
    cache = ZayaCache(model.config)
    model(prompt, attention_mask=mask, position_ids=positions(mask), cache=cache)
    cache.select(torch.tensor([2, 0]))
    nxt = torch.randint(3, model.config.vocab_size, (2, 1))
    pos = positions(mask)[[2, 0], -1:] + 1
    got = model(nxt, position_ids=pos, cache=cache).logits[:, -1]
    full_ids = torch.cat([prompt[[2, 0]], nxt], dim=1)
    full_mask = torch.cat([mask[[2, 0]], torch.ones_like(nxt)], dim=1)
    want = model(full_ids, attention_mask=full_mask, position_ids=positions(full_mask)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def greedy(model, prompt, mask, new_tokens):
    cache = ZayaCache(model.config)
    pos = positions(mask)
    logits = model(prompt, attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1]
    next_pos = pos[:, -1:] + 1
    tokens = []
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        logits = model(token, position_ids=next_pos, cache=cache).logits[:, -1]
        next_pos = next_pos + 1
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def test_greedy_tokens_equal_hf_generate(models):
    hf_model, model = models
    prompt, mask = left_padded_batch(model.config.vocab_size, [3, 10, 7, 1])
    ours = greedy(model, prompt, mask, new_tokens=12)
    theirs = hf_model.generate(
        prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[:, prompt.shape[1] :]
    assert torch.equal(ours, theirs)
