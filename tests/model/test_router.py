"""Router replay and per-layer expert load counts."""

import pytest
import torch

from tests.model.hf_reference import ours_from_hf, randomized_hf_model
from zaya_train.model import preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = preset("nano", num_hidden_layers=3, num_experts=6)
    return ours_from_hf(config, randomized_hf_model(config, bias_std=0.05))


@torch.no_grad()
def test_replaying_recorded_ids_reproduces_the_forward(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    recorded = model(ids, return_expert_ids=True)
    replayed = model(ids, expert_ids=recorded.expert_ids, return_expert_ids=True)
    assert torch.equal(replayed.logits, recorded.logits)
    assert torch.equal(replayed.expert_ids, recorded.expert_ids)


@torch.no_grad()
def test_other_ids_change_the_routing(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    recorded = model(ids, return_expert_ids=True)
    other = (recorded.expert_ids + 1) % model.config.num_experts
    replayed = model(ids, expert_ids=other, return_expert_ids=True)
    assert torch.equal(replayed.expert_ids, other)
    assert not torch.allclose(replayed.logits, recorded.logits)


def test_replay_trains_the_replayed_experts(model):
    """Gradients reach exactly the experts the replayed ids name."""
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    routes = torch.zeros(1, 12, model.config.num_hidden_layers, dtype=torch.long)
    routes[..., 0] = 2  # layer 0: every token to expert 2
    routes[0, :6, 1] = model.config.num_experts  # layer 1: half the tokens skip, half to expert 4
    routes[0, 6:, 1] = 4
    model.zero_grad(set_to_none=True)
    model(ids, expert_ids=routes).logits.sum().backward()
    for layer, used in [(0, {2}), (1, {4})]:
        grad = model.model.layers[layer].mlp.experts.gate_up_proj.grad
        touched = {e for e in range(model.config.num_experts) if grad[e].abs().sum() > 0}
        assert touched == used
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_tokens_per_expert_counts_real_tokens(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model(ids, attention_mask=mask, return_expert_ids=True)
    for layer in range(model.config.num_hidden_layers):
        chosen = out.expert_ids[..., layer][mask.bool()]
        expected = torch.bincount(chosen, minlength=model.config.num_experts + 1)
        assert torch.equal(out.tokens_per_expert[layer], expected)
    assert out.tokens_per_expert.sum(-1).tolist() == [17] * model.config.num_hidden_layers


def test_replay_ids_are_validated(model):
    ids = torch.randint(3, model.config.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="expert_ids"):
        model(ids, expert_ids=torch.full((1, 4, 3), model.config.num_experts + 1))
    with pytest.raises(ValueError, match="shape"):
        model(ids, expert_ids=torch.zeros(1, 4, 2, dtype=torch.long))


@torch.no_grad()
def test_packed_padding_is_not_counted(model):
    ids = torch.randint(3, model.config.vocab_size, (1, 10))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1, -1]])
    out = model(ids, document_ids=doc_ids)
    assert out.tokens_per_expert.sum(-1).tolist() == [7] * model.config.num_hidden_layers
