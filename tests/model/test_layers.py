"""The hand-written backward passes of RMSNorm and residual scaling equal autograd on the plain formulas."""

import pytest
import torch

from zaya_train.model.layers import rms_norm, scale_residual


def reference_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)


def reference_residual_scaling(h, r, hb, hs, rb, rs):
    return (h.float() + hb) * hs + (r + rb) * rs


def value_and_grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_autograd(dtype):
    x = (torch.randn(3, 5, 24) * 3).to(dtype)
    weight = torch.randn(24).to(dtype)
    grad_out = torch.randn(3, 5, 24).to(dtype)
    ours = value_and_grads(lambda x, w: rms_norm(x, w, 1e-5), [x, weight], grad_out)
    ref = value_and_grads(lambda x, w: reference_rms_norm(x, w, 1e-5), [x, weight], grad_out)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for name, a, b in zip(["y", "x.grad", "weight.grad"], ours, ref):
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_residual_scaling_matches_autograd():
    inputs = [torch.randn(2, 7, 16), torch.randn(2, 7, 16)] + [torch.randn(16) for _ in range(4)]
    grad_out = torch.randn(2, 7, 16)
    ours = value_and_grads(scale_residual, inputs, grad_out)
    ref = value_and_grads(reference_residual_scaling, inputs, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
