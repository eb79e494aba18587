"""The Triton RMSNorm and fused residual-scaling + RMSNorm kernels, run by the Triton interpreter on the CPU,
equal their PyTorch references (the model's `rms_norm` and `scale_residual` then `rms_norm`) in outputs and in
every gradient: fp32 to rounding, bf16 to one bf16 rounding; at sizes that are not block multiples (48
features in 64-wide blocks, 37-38 rows in 4-row tiles) and with the backward split over several programs."""

import pytest
import torch

from zaya_train.model.layers import rms_norm as reference_rms_norm
from zaya_train.model.layers import scale_residual

EPS = 1e-5
# 4-row tiles over 37 rows leave a partial tile; programs_per_sm=4 (the CPU counts one "SM") splits the
# backward into 4 programs of 12 rows, so the per-program column sums are added up across programs.
TILED = {"BLOCK_N": 4, "programs_per_sm": 4}


def tolerances(dtype: torch.dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1.6e-2}


def run(fn, inputs, upstream):
    """Outputs of fn(*inputs) and the gradients of sum(output * upstream) w.r.t. each input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((out.float() * up.float()).sum() for out, up in zip(outputs, upstream) if up is not None)
    loss.backward()
    return [out.detach() for out in outputs], [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [TILED, {"BLOCK_N": 1, "programs_per_sm": 64}], ids=["tiled", "one_row"])
def test_rms_norm_matches_reference(interpret, dtype, config):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    upstream = [torch.randn(37, 48, generator=g).to(dtype)]

    got, got_grads = run(lambda x, w: interpret.rms_norm.rms_norm(x, w, EPS, config), (x, weight), upstream)
    want, want_grads = run(lambda x, w: reference_rms_norm(x, w, EPS), (x, weight), upstream)
    assert got[0].dtype == want[0].dtype == dtype
    torch.testing.assert_close(got[0], want[0], **tolerances(dtype))
    for name, grad, ref in zip(("x", "weight"), got_grads, want_grads):
        torch.testing.assert_close(grad, ref, **tolerances(dtype), msg=name)
    with torch.no_grad():  # the forward-only path (decoding) skips autograd
        forward_only = interpret.rms_norm.rms_norm(x, weight, EPS, config)
        torch.testing.assert_close(forward_only, want[0], **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual_used", [True, False], ids=["residual_used", "residual_unused"])
def test_residual_rms_norm_matches_scale_then_norm(interpret, dtype, residual_used):
    """As in a model of `dtype`: the sublayer output and the parameters in `dtype`, the residual stream in
    fp32. The new residual's gradient from later layers (when it is used) joins the norm's."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 19, 48, generator=g).to(dtype)
    residual = torch.randn(2, 19, 48, generator=g)
    h_bias, r_bias = ((0.1 * torch.randn(48, generator=g)).to(dtype) for _ in range(2))
    h_scale, r_scale = ((1 + 0.2 * torch.randn(48, generator=g)).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    inputs = (hidden, residual, h_bias, h_scale, r_bias, r_scale, weight)
    dz, dy = torch.randn(2, 19, 48, generator=g), torch.randn(2, 19, 48, generator=g)
    upstream = [dz if residual_used else None, dy]

    def fused(*t):
        return interpret.rms_norm.residual_rms_norm(*t, EPS, TILED)

    def reference(hidden, residual, h_bias, h_scale, r_bias, r_scale, weight):
        z = scale_residual(hidden, residual, h_bias, h_scale, r_bias, r_scale)
        return z, reference_rms_norm(z, weight, EPS)

    (z, y), got_grads = run(fused, inputs, upstream)
    (z_ref, y_ref), want_grads = run(reference, inputs, upstream)
    assert z.dtype == torch.float32 and y.dtype == dtype
    torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, y_ref, **tolerances(dtype))
    names = ("hidden", "residual", "h_bias", "h_scale", "r_bias", "r_scale", "weight")
    for name, grad, ref in zip(names, got_grads, want_grads):
        assert grad.dtype == ref.dtype, name
        # Column sums over 38 rows in another order: fp32 rounding, or one bf16 rounding of the sum.
        torch.testing.assert_close(grad, ref, **tolerances(dtype), msg=name)


def test_rms_norm_rejects_a_wrong_weight(interpret):
    with pytest.raises(ValueError, match="weight has shape"):
        interpret.rms_norm.rms_norm(torch.randn(3, 8), torch.ones(7), EPS)
