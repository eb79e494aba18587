"""The hand-written backward passes of RMSNorm, residual scaling and partial RoPE equal autograd on independent
formulas; the no-autograd paths (decoding) compute the same values."""

import pytest
import torch

from zaya_train.model.layers import apply_partial_rope, rms_norm, rope_cos_sin, rope_inv_freq, scale_residual


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
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    for name, a, b in zip(["y", "x.grad", "weight.grad"], ours, ref):
        torch.testing.assert_close(a, b, **tol, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, weight, 1e-5), ours[0], atol=0, rtol=0)


def test_residual_scaling_matches_autograd():
    inputs = [torch.randn(2, 7, 16), torch.randn(2, 7, 16)] + [torch.randn(16) for _ in range(4)]
    grad_out = torch.randn(2, 7, 16)
    ours = value_and_grads(scale_residual, inputs, grad_out)
    ref = value_and_grads(reference_residual_scaling, inputs, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def reference_partial_rope(x, positions, theta, rotary_dim):
    """Channel pair (i, i + R/2) of each head as the complex number x_i + j x_{i+R/2}, turned by the angle
    position * theta^(-2i/R); channels from R on unchanged."""
    half = rotary_dim // 2
    angle = positions[..., None].double() * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    turn = torch.polar(torch.ones_like(angle), angle)[:, :, None, :]
    z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double()) * turn
    return torch.cat([z.real, z.imag, x[..., rotary_dim:].double()], dim=-1).to(x.dtype)


def test_partial_rope_matches_complex_rotation():
    positions = torch.arange(9)[None].expand(2, 9) + torch.tensor([[0], [5]])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(10000.0, 8))
    x = torch.randn(2, 9, 3, 16)
    grad_out = torch.randn(2, 9, 3, 16)
    ours = value_and_grads(lambda x: apply_partial_rope(x, cos, sin), [x], grad_out)
    ref = value_and_grads(lambda x: reference_partial_rope(x, positions, 10000.0, 8), [x], grad_out)
    for name, a, b in zip(["y", "x.grad"], ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(apply_partial_rope(x, cos, sin), ours[0], atol=0, rtol=0)
