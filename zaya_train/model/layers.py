"""Small building blocks shared by the ZAYA1 modules: linear, RMSNorm, learned residual scaling, partial RoPE.

Shape suffixes: B batch, S sequence, H heads, D hidden, d head dim, R rotary dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zaya_train.kernels.dispatch import use_triton
from zaya_train.kernels.linear import linear


class Linear(nn.Linear):
    """nn.Linear through `zaya_train.kernels.linear` (oneDNN for fp32 on CPU): the same parameters, and the same
    results up to rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class _RMSNorm(torch.autograd.Function):
    """y = w * (x / rms(x)), statistics in fp32. Saves x and 1/rms only; the backward is the closed form
    dx = (g*w - xhat * mean(g*w*xhat)) / rms, far fewer passes than autograd's chain of elementwise ops."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).to(weight.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_y = grad_y.float()
        grad_weight = (grad_y * xhat).flatten(0, -2).sum(0).to(weight.dtype)
        grad_xhat = grad_y * weight.float()
        grad_x = torch.addcmul(grad_xhat, xhat, (grad_xhat * xhat).mean(-1, keepdim=True), value=-1.0).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    # Without autograd (decoding, evaluation) PyTorch's fused op is cheaper than a custom Function's dispatch; it
    # applies an fp32 weight in the same pass, with the same rounding as normalising and then scaling.
    if weight.dtype == torch.float32:
        return F.rms_norm(x.float(), (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(weight.dtype) * weight


class ZayaRMSNorm(nn.Module):
    """RMSNorm with fp32 statistics; the output is cast to the weight's dtype (the compute dtype). `kernels`
    ("auto" | "triton" | "torch", set by the model from ZayaConfig.kernels) chooses between the Triton kernel
    (zaya_train.kernels.rms_norm) and the PyTorch ops of this file, its reference (see
    zaya_train.kernels.dispatch)."""

    def __init__(self, hidden_size: int, eps: float, kernels: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = kernels

    def forward(
        self, x: torch.Tensor, scaling: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """rms_norm(x). With `scaling` = (residual, h_bias, h_scale, r_bias, r_scale), from
        ZayaResidualScaling, x is a sublayer's output: returns (z, rms_norm(z)) for the new residual stream
        z = (x + h_bias) * h_scale + (residual + r_bias) * r_scale, in one fused kernel on the Triton path."""
        if scaling is None:
            if use_triton("rms_norm", self.kernels, x.device):
                from zaya_train.kernels.rms_norm import rms_norm as triton_rms_norm

                return triton_rms_norm(x, self.weight, self.eps)
            return rms_norm(x, self.weight, self.eps)
        if use_triton("residual_rms_norm", self.kernels, x.device):
            from zaya_train.kernels.rms_norm import residual_rms_norm

            return residual_rms_norm(x, *scaling, self.weight, self.eps)
        z = scale_residual(x, *scaling)
        return z, rms_norm(z, self.weight, self.eps)


def residual_bias(h_bias, h_scale, r_bias, r_scale) -> torch.Tensor:
    """The constant term b_h * s_h + b_r * s_r of the residual merge, fp32 [D]."""
    return h_bias.float() * h_scale + r_bias.float() * r_scale


def merge_residual(hidden, residual, bias, h_scale, r_scale) -> torch.Tensor:
    """h * s_h + r * s_r + bias, with `bias` from `residual_bias`: two passes over the activations."""
    return torch.addcmul(bias, hidden.float(), h_scale).addcmul_(residual, r_scale)


def _residual_scaling(hidden, residual, h_bias, h_scale, r_bias, r_scale) -> torch.Tensor:
    """(h + b_h) * s_h + (r + b_r) * s_r as h * s_h + r * s_r + (b_h * s_h + b_r * s_r): two passes over the
    activations instead of five (the elementwise passes are memory-bound on CPUs)."""
    return merge_residual(hidden, residual, residual_bias(h_bias, h_scale, r_bias, r_scale), h_scale, r_scale)


class _ResidualScaling(torch.autograd.Function):
    """(h + b_h) * s_h + (r + b_r) * s_r in fp32; saves only h and r."""

    @staticmethod
    def forward(ctx, hidden, residual, h_bias, h_scale, r_bias, r_scale):
        ctx.save_for_backward(hidden, residual, h_bias, h_scale, r_bias, r_scale)
        return _residual_scaling(hidden, residual, h_bias, h_scale, r_bias, r_scale)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, residual, h_bias, h_scale, r_bias, r_scale = ctx.saved_tensors
        grad_out = grad_out.float()
        grad_flat = grad_out.flatten(0, -2)
        grad_sum = grad_flat.sum(0)
        # sum(g * (h + b_h)) = sum(g * h) + b_h * sum(g): no pass to form h + b_h.
        grad_h_scale = (grad_flat * hidden.float().flatten(0, -2)).sum(0) + h_bias * grad_sum
        grad_r_scale = (grad_flat * residual.float().flatten(0, -2)).sum(0) + r_bias * grad_sum
        return (
            (grad_out * h_scale).to(hidden.dtype),
            (grad_out * r_scale).to(residual.dtype),
            (grad_sum * h_scale).to(h_bias.dtype),
            grad_h_scale.to(h_scale.dtype),
            (grad_sum * r_scale).to(r_bias.dtype),
            grad_r_scale.to(r_scale.dtype),
        )


def scale_residual(
    hidden: torch.Tensor, residual: torch.Tensor, h_bias: torch.Tensor, h_scale: torch.Tensor, r_bias: torch.Tensor,
    r_scale: torch.Tensor,
) -> torch.Tensor:
    if _needs_grad(hidden, residual, h_bias, h_scale, r_bias, r_scale):
        return _ResidualScaling.apply(hidden, residual, h_bias, h_scale, r_bias, r_scale)
    return _residual_scaling(hidden, residual, h_bias, h_scale, r_bias, r_scale)


class ZayaResidualScaling(nn.Module):
    """Merges a sublayer output into the residual stream: (h + b_h) * s_h + (r + b_r) * s_r, in fp32."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden_size))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden_size))
        self.residual_scale = nn.Parameter(torch.ones(hidden_size))
        self.residual_bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(
        self, hidden_BSD: torch.Tensor, residual_BSD: torch.Tensor, norm: ZayaRMSNorm | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The new residual stream; with `norm`, (the new residual, norm(it)), fused on the Triton path.
        `norm` is called from inside this forward, not its weight read here, so that ZeRO-3 has gathered both
        modules' parameters when the fused op reads them."""
        params = (self.hidden_states_bias, self.hidden_states_scale, self.residual_bias, self.residual_scale)
        if norm is not None:
            return norm(hidden_BSD, scaling=(residual_BSD, *params))
        return scale_residual(hidden_BSD, residual_BSD, *params)

    def merge_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias, s_h, s_r) for `merge_residual`, for callers that merge many times on unchanged weights."""
        h_scale, r_scale = self.hidden_states_scale, self.residual_scale
        return residual_bias(self.hidden_states_bias, h_scale, self.residual_bias, r_scale), h_scale, r_scale


def rope_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rope_cos_sin(position_ids_BS: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, S, R] for NeoX-style (rotate-half) RoPE, in fp32."""
    freqs_BSR2 = position_ids_BS[..., None].float() * inv_freq.to(position_ids_BS.device)
    emb_BSR = torch.cat((freqs_BSR2, freqs_BSR2), dim=-1)
    return emb_BSR.cos(), emb_BSR.sin()


def partial_rope(x_BSHd: torch.Tensor, cos_BS1R: torch.Tensor, sin_BS1R: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on the first R channels of the last dim; cos/sin [..., R] broadcast against x."""
    rotary_dim = cos_BS1R.shape[-1]
    x_rot, x_pass = x_BSHd[..., :rotary_dim], x_BSHd[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos_BS1R + rotated * sin_BS1R, x_pass), dim=-1)


class _PartialRope(torch.autograd.Function):
    """Rotate-half RoPE is linear in x: dx_rot = g*cos + rotate_half^T(g*sin), with rotate_half^T(u) = (u2, -u1);
    dx_pass = g_pass. Written into one buffer, instead of autograd's zero-filled full-width gradient per slice
    (four per call) and the adds that merge them; the same products and sums, so the same values."""

    @staticmethod
    def forward(ctx, x_BSHd, cos_BS1R, sin_BS1R):
        ctx.save_for_backward(cos_BS1R, sin_BS1R)
        return partial_rope(x_BSHd, cos_BS1R, sin_BS1R)

    @staticmethod
    def backward(ctx, grad_BSHd):
        cos_BS1R, sin_BS1R = ctx.saved_tensors
        rotary_dim = cos_BS1R.shape[-1]
        half = rotary_dim // 2
        grad_rot = grad_BSHd[..., :rotary_dim]
        along_cos, along_sin = grad_rot * cos_BS1R, grad_rot * sin_BS1R
        grad_x = torch.empty_like(grad_BSHd)
        torch.add(along_cos[..., :half], along_sin[..., half:], out=grad_x[..., :half])
        torch.sub(along_cos[..., half:], along_sin[..., :half], out=grad_x[..., half:rotary_dim])
        grad_x[..., rotary_dim:] = grad_BSHd[..., rotary_dim:]
        return grad_x, None, None


def apply_partial_rope(x_BSHd: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotates the first R channels of every head; the remaining channels carry no position."""
    cos_BS1R, sin_BS1R = cos_BSR[:, :, None, :], sin_BSR[:, :, None, :]
    if _needs_grad(x_BSHd):
        return _PartialRope.apply(x_BSHd, cos_BS1R, sin_BS1R)
    return partial_rope(x_BSHd, cos_BS1R, sin_BS1R)
