"""Training switches: activation checkpointing, the label loss, bf16 compute with an fp32 residual stream; and
the training path's gradients against transformers."""

import pytest
import torch
import torch.nn.functional as F

from tests.model.hf_reference import ours_from_hf, randomized_hf_model
from zaya_train.kernels import linear as kernels_linear
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


@pytest.mark.parametrize("cpu_gemm", ["onednn", "reference"])
def test_training_gradients_equal_transformers(cpu_gemm, monkeypatch):
    """Loss and every parameter gradient of the training path (fused LM-head loss, grouped experts, the CPU GEMM
    kernels with their written-out backward passes) equal transformers' model on the same weights."""
    if cpu_gemm == "onednn":
        monkeypatch.setattr(kernels_linear, "ONEDNN_MIN_MACS", 0)  # every GEMM, however small, takes oneDNN
        monkeypatch.setattr(kernels_linear, "cpu_gemm_route", lambda: "onednn")
    else:
        monkeypatch.setattr(kernels_linear, "uses_onednn", lambda *_: False)
    torch.manual_seed(0)
    config = preset("nano", num_hidden_layers=3, attention_bias=True, layer_types=["hybrid", "hybrid_sliding", "hybrid"],
                    sliding_window=6)
    hf_model = randomized_hf_model(config, std=0.1, bias_std=0.0).train()
    model = ours_from_hf(config, hf_model).train()
    ids = torch.randint(3, config.vocab_size, (3, 20))
    ours = model(ids, labels=ids, return_logits=False)
    ours.loss.backward()
    theirs = hf_model(ids, labels=ids)
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    hf_params = dict(hf_model.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        torch.testing.assert_close(param.grad, hf_params[name].grad, atol=1e-5, rtol=1e-3, msg=name)
        checked += 1
    assert checked >= 40


def test_tied_init_draws_the_embedding_once_with_a_zero_padding_row():
    config = preset("nano", vocab_size=20, pad_token_id=0)
    model = ZayaForCausalLM(config)
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    assert torch.equal(embedding[0], torch.zeros(config.hidden_size))
    assert embedding[1:].std().item() == pytest.approx(config.initializer_range, rel=0.1)
