"""The fused chunked LM head + cross-entropy equals logits + F.cross_entropy, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.model.loss import linear_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_fused_loss_matches_reference(bias, chunk_size):
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    fused = linear_cross_entropy(hidden, weight, b, labels, chunk_size=chunk_size)
    (2.5 * fused).backward()
    grads = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    ref = F.cross_entropy(F.linear(hidden, weight, b), labels, ignore_index=-100)
    (2.5 * ref).backward()
    torch.testing.assert_close(fused, ref)
    for got, want in zip(grads, [t.grad for t in (hidden, weight, b) if t is not None]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_forward_without_logits_matches_logits_path():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2))
    ids = torch.randint(3, 64, (3, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(ids, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(fused.loss, ref.loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)
