"""The whole nano model with its kernels on (`kernels="triton"`, the Triton interpreter on the CPU) equals the
same model with them off (`kernels="torch"`, the PyTorch references): logits, the fused training loss and the
per-token log-probabilities at a temperature, and every parameter's gradient; and the kernels did run."""

import importlib

import pytest
import torch

from zaya_train.model import ZayaForCausalLM, preset


@pytest.fixture
def launches(interpret, monkeypatch):
    """Counts the calls of each kernel entry point the model routes through."""
    counts = {}
    moe = importlib.import_module("zaya_train.kernels.moe")
    cca = importlib.import_module("zaya_train.kernels.cca")
    for module, name in [(interpret.rms_norm, "rms_norm"), (interpret.rms_norm, "residual_rms_norm"),
                         (interpret.lm_head, "linear_cross_entropy"), (interpret.lm_head, "token_logprobs"),
                         (moe, "moe_experts"), (cca, "cca_conv_qk")]:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def test_nano_model_with_kernels_equals_without(launches):
    torch.manual_seed(0)
    model = ZayaForCausalLM(preset("nano", kernels="torch"))
    ids = torch.randint(3, 64, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    upstream_BS = torch.randn(2, 8)

    def grads(path: str) -> dict:
        return {f"{path} grad {n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def results(mode: str) -> dict:
        model.set_kernels(mode)
        out = {}
        with torch.no_grad():
            out["logits"] = model(ids).logits
        model.zero_grad()
        loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        out["loss"] = loss.detach()
        out.update(grads("loss"))
        model.zero_grad()
        out_rl = model(ids, labels=labels, return_logits=False, return_logprobs=True, logprob_temperature=0.7)
        logprobs = out_rl.logprobs
        (logprobs * upstream_BS).sum().backward()
        out["logprobs"] = logprobs.detach()
        out.update(grads("logprob"))
        return out

    reference = results("torch")
    assert not launches
    kernels = results("triton")
    assert model.config.kernels == "triton"
    # Per forward: 2 plain norms per layer (input, router) + the final one; one fused norm per layer.
    assert launches["residual_rms_norm"] >= 3 * 4 and launches["rms_norm"] >= 3 * 9
    assert launches["linear_cross_entropy"] == 1 and launches["token_logprobs"] == 1
    assert launches["moe_experts"] == 3 * 4  # one per layer per forward
    assert launches["cca_conv_qk"] == 3 * 4  # one per attention layer per forward
    assert kernels.keys() == reference.keys()
    for name, want in reference.items():
        torch.testing.assert_close(kernels[name], want, atol=1e-5, rtol=1e-4, msg=name)
