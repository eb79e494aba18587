"""Training switches: activation checkpointing, the label loss, bf16 compute with an fp32 residual stream."""

import torch
import torch.nn.functional as F

from zaya_train.model import ZayaForCausalLM, preset


def grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2)).train()
    ids = torch.randint(3, 64, (2, 24))
    loss_plain, plain = grads(model, ids, ids)
    model.gradient_checkpointing_enable()
    loss_ckpt, ckpt = grads(model, ids, ids)
    assert torch.equal(loss_plain, loss_ckpt)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5, msg=name)


def test_label_loss_is_shifted_cross_entropy():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=1))
    ids = torch.randint(3, 64, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_bf16_weights_keep_an_fp32_residual_stream():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2)).to(torch.bfloat16)
    ids = torch.randint(3, 64, (2, 16))
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    out = model(ids, labels=ids)
    handle.remove()
    assert seen == [torch.float32]
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
