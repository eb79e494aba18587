"""Packed rows: several documents per row compute exactly what each document computes alone."""

import pytest
import torch

from tests.model.hf_reference import ours_from_hf, randomized_hf_model
from zaya_train.model import preset

# Boundary handling is stressed with biases (a pre-document conv input is zero, not the projection bias) and
# with three conv taps of history.
CONFIG = dict(
    num_hidden_layers=3, attention_bias=True, cca_time0=2, cca_time1=3,
    layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=3,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = preset("nano", **CONFIG)
    return ours_from_hf(config, randomized_hf_model(config))


def packed_rows(doc_lengths: list[list[int]], vocab: int):
    rows, doc_rows, docs = [], [], []
    next_doc = 0
    for lengths in doc_lengths:
        row_docs = [torch.randint(3, vocab, (n,)) for n in lengths]
        docs.extend(row_docs)
        rows.append(torch.cat(row_docs))
        doc_rows.append(torch.cat([torch.full((n,), next_doc + i) for i, n in enumerate(lengths)]))
        next_doc += len(lengths)
    return torch.stack(rows), torch.stack(doc_rows), docs


@torch.no_grad()
def test_packed_equals_documents_alone(model):
    ids, doc_ids, docs = packed_rows([[5, 1, 7, 3], [2, 9, 5]], model.config.vocab_size)
    out = model(ids, document_ids=doc_ids, return_expert_ids=True)
    packed_logits = out.logits.flatten(0, 1)
    packed_routes = out.expert_ids.flatten(0, 1)
    start = 0
    for doc in docs:
        alone = model(doc[None], return_expert_ids=True)
        n = doc.numel()
        torch.testing.assert_close(packed_logits[start : start + n], alone.logits[0], atol=1e-5, rtol=0)
        assert torch.equal(packed_routes[start : start + n], alone.expert_ids[0])
        start += n


@torch.no_grad()
def test_cu_seqlens_equals_document_ids(model):
    ids, doc_ids, _ = packed_rows([[4, 6], [3, 3, 4]], model.config.vocab_size)
    cu_seqlens = torch.tensor([0, 4, 10, 13, 16, 20])
    a = model(ids, document_ids=doc_ids).logits
    b = model(ids, cu_seqlens=cu_seqlens).logits
    assert torch.equal(a, b)


def test_packed_gradients_stay_inside_documents(model):
    ids, doc_ids, _ = packed_rows([[6, 6]], model.config.vocab_size)
    embeds = model.model.embed_tokens
    captured = {}
    handle = embeds.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    try:
        logits = model(ids, document_ids=doc_ids).logits
        captured["x"].retain_grad()
        logits[0, 11].sum().backward()  # last token of document 1
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    grad = captured["x"].grad[0].abs().sum(-1)
    assert (grad[:6] == 0).all() and (grad[6:] > 0).all()


def test_cu_seqlens_must_not_cross_rows(model):
    ids = torch.randint(3, 60, (2, 5))
    with pytest.raises(ValueError, match="crosses a row boundary"):
        model(ids, cu_seqlens=torch.tensor([0, 7, 10]))
