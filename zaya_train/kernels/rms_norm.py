"""RMSNorm with fp32 statistics, optionally fused with ZAYA1's learned residual scaling, as Triton kernels.

    y = rms_norm(x, weight, eps)               # weight * (x / rms(x)), statistics in fp32
    z, y = residual_rms_norm(h, r, h_bias, h_scale, r_bias, r_scale, weight, eps)
    # z = (h + h_bias) * h_scale + (r + r_bias) * r_scale: the new residual stream, fp32; y = rms_norm(z)

The PyTorch references these must equal are the model's own ops, which stay its `torch` path:
`zaya_train.model.layers.rms_norm` (`_RMSNorm`) and `scale_residual` followed by `rms_norm`
(tests/kernels/test_rms_norm.py compares the two in outputs and gradients under TRITON_INTERPRET=1).

Why fuse: in a ZAYA1 block the attention output is merged into the fp32 residual stream and the sum is normed
at once for the MoE. Unfused, that is one elementwise op writing z and an RMSNorm reading it back, and their
backwards read h, r, z and the gradients again. Fused, the forward reads h and r once and writes z and y; the
backward recomputes z from h and r (cheaper than reading it) and writes dh and dr in the same pass as the
norm's gradient. Per-feature parameter gradients (norm weight, the two biases and two scales) are column sums
over all tokens: each backward program accumulates the sums of its own rows in registers and writes one row of
partials, which PyTorch then adds up ([programs, D], a few hundred rows), so no atomics and a deterministic
result.

Layers: `_rms_norm_fwd_kernel` / `_rms_norm_bwd_kernel` (Triton), `_forward` / `_backward` (launchers: shape
checks, launch configs from `configs/<device>.json`), `RMSNormFunction` / `ResidualRMSNormFunction`
(autograd), `rms_norm` / `residual_rms_norm` (what the model calls).

Shape suffixes: N tokens (rows), D hidden (normalised dimension), P backward programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from zaya_train.kernels.configs import launch_config, multiprocessor_count

# A whole row lives in one program's registers; wider rows would spill (ZAYA1 sizes are 2048 and below).
MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_fwd_kernel(
    # x [N, D], any float dtype: the norm's input, or with HAS_SCALING the sublayer output h.
    x_ptr, stride_x,
    # r [N, D] the residual stream in, z [N, D] fp32 the residual stream out (HAS_SCALING only).
    r_ptr, stride_r, z_ptr, stride_z,
    # [D] each: h bias, h scale, residual bias, residual scale (HAS_SCALING only).
    hb_ptr, hs_ptr, rb_ptr, rs_ptr,
    # w [D] the norm weight; y [N, D] in w's dtype; rstd [N] fp32 = 1 / rms per row, for the backward.
    w_ptr, y_ptr, stride_y, rstd_ptr,
    N, D, eps,
    HAS_SCALING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # N * D can pass 2**31
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALING:
        r = tl.load(r_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hb = tl.load(hb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        hs = tl.load(hs_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        rb = tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        rs = tl.load(rs_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = (x + hb[None, :]) * hs[None, :] + (r + rb[None, :]) * rs[None, :]
        tl.store(z_ptr + rows64 * stride_z + cols[None, :], x, mask=mask)
    # Padding columns are 0 in x, so they add nothing to the sum; the mean divides by the true D.
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    # As the reference: x / rms rounded to the weight's dtype, then times the weight in that dtype. A product
    # of two bf16 (or fp16) numbers is exact in fp32, so multiplying in fp32 and rounding once is that product
    # (and the interpreter, whose numpy has no bf16 arithmetic, computes it right too).
    xhat = (x * rstd[:, None]).to(w.dtype).to(tl.float32)
    y = (xhat * w.to(tl.float32)[None, :]).to(w.dtype)
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    # dy [N, D] grad of y; dz [N, D] grad of the residual out from later layers (HAS_DZ: z is used
    # downstream).
    dy_ptr, stride_dy, dz_ptr, stride_dz,
    # The forward's inputs: x [N, D], r [N, D] and the four [D] scaling vectors (HAS_SCALING), w [D], rstd
    # [N].
    x_ptr, stride_x, r_ptr, stride_r,
    hb_ptr, hs_ptr, rb_ptr, rs_ptr, w_ptr, rstd_ptr,
    # dx [N, D] in x's dtype; dr [N, D] in r's dtype (HAS_SCALING).
    dx_ptr, stride_dx, dr_ptr, stride_dr,
    # part [4, P, D] fp32, this program's column sums: dy * xhat (-> dw), then with HAS_SCALING the residual
    # gradient g_z (-> both bias grads), g_z * (h + hb) (-> dh_scale) and g_z * (r + rb) (-> dr_scale).
    part_ptr,
    N, D, rows_per_program,
    HAS_SCALING: tl.constexpr, HAS_DZ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_SCALING:
        hb = tl.load(hb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        hs = tl.load(hs_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        rb = tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        rs = tl.load(rs_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dz = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dhs = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_drs = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_begin = pid * rows_per_program
    for start in range(row_begin, row_begin + rows_per_program, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALING:
            # Recompute the forward's z from h and r (both read anyway for the scale gradients).
            x = x + hb[None, :]
            r = tl.load(r_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            r = r + rb[None, :]
            z = x * hs[None, :] + r * rs[None, :]
        else:
            z = x
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        zhat = z * rstd[:, None]  # 0 on padding rows (rstd 0) and padding columns (z 0)
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_dw += tl.sum(dy * zhat, axis=0)
        g = dy * w[None, :]
        # d/dz of w * z * rstd(z): rstd * (g - zhat * mean(g * zhat)), the closed form the reference uses.
        dz = rstd[:, None] * (g - zhat * (tl.sum(g * zhat, axis=1) / D)[:, None])
        if HAS_DZ:
            dz += tl.load(dz_ptr + rows64 * stride_dz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALING:
            dx = dz * hs[None, :]
            dr = (dz * rs[None, :]).to(dr_ptr.dtype.element_ty)
            tl.store(dr_ptr + rows64 * stride_dr + cols[None, :], dr, mask=mask)
            acc_dz += tl.sum(dz, axis=0)
            acc_dhs += tl.sum(dz * x, axis=0)
            acc_drs += tl.sum(dz * r, axis=0)
        else:
            dx = dz
        tl.store(dx_ptr + rows64 * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid * D + cols, acc_dw, mask=col_mask)
    if HAS_SCALING:
        tl.store(part_ptr + (num_programs + pid) * D + cols, acc_dz, mask=col_mask)
        tl.store(part_ptr + (2 * num_programs + pid) * D + cols, acc_dhs, mask=col_mask)
        tl.store(part_ptr + (3 * num_programs + pid) * D + cols, acc_drs, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [N, D] with unit stride along D (a view when it already is)."""
    t_ND = t.reshape(-1, t.shape[-1])
    return t_ND if t_ND.stride(-1) == 1 else t_ND.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor, scaling: tuple[torch.Tensor, ...] | None) -> None:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({hidden},)")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm: the Triton kernel takes at most {MAX_HIDDEN} features, got {hidden}")
    if scaling is not None:
        residual, *vectors = scaling
        if residual.shape != x.shape:
            raise ValueError(
                f"residual_rms_norm: residual {tuple(residual.shape)} != hidden {tuple(x.shape)}"
            )
        if any(v.shape != (hidden,) for v in vectors):
            raise ValueError(f"residual_rms_norm: biases and scales must have shape ({hidden},)")


def _forward(
    x: torch.Tensor, scaling: tuple[torch.Tensor, ...] | None, weight: torch.Tensor, eps: float,
    config: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(z or None, y, rstd_N) for x [..., D]; `scaling` = (residual, h_bias, h_scale, r_bias, r_scale)."""
    _check(x, weight, scaling)
    x_ND = _rows(x)
    num_rows, hidden = x_ND.shape
    y_ND = torch.empty((num_rows, hidden), device=x.device, dtype=weight.dtype)
    rstd_N = torch.empty(num_rows, device=x.device, dtype=torch.float32)
    z_ND = r_ND = None
    if scaling is not None:
        r_ND = _rows(scaling[0])
        z_ND = torch.empty((num_rows, hidden), device=x.device, dtype=torch.float32)
    if num_rows:
        cfg = launch_config("rms_norm_fwd", hidden, x.device, config)
        block_n = cfg.meta["BLOCK_N"]
        vectors = scaling[1:] if scaling is not None else (weight,) * 4  # unused pointers without scaling
        _rms_norm_fwd_kernel[(triton.cdiv(num_rows, block_n),)](
            x_ND, x_ND.stride(0),
            r_ND if r_ND is not None else x_ND, r_ND.stride(0) if r_ND is not None else 0,
            z_ND if z_ND is not None else y_ND, z_ND.stride(0) if z_ND is not None else 0,
            *vectors,
            weight, y_ND, y_ND.stride(0), rstd_N,
            num_rows, hidden, eps,
            HAS_SCALING=scaling is not None, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(hidden),
            **cfg.options,
        )
    y = y_ND.view(x.shape)
    return (z_ND.view(x.shape) if z_ND is not None else None), y, rstd_N


def _backward(
    dy: torch.Tensor, dz: torch.Tensor | None, x: torch.Tensor, scaling: tuple[torch.Tensor, ...] | None,
    weight: torch.Tensor, rstd_N: torch.Tensor, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The forward's gradients: (dx, dr or None, column sums [4, D] fp32: dw, sum g_z, sum g_z*(h+hb),
    sum g_z*(r+rb))."""
    x_ND = _rows(x)
    num_rows, hidden = x_ND.shape
    dy_ND = _rows(dy)
    dx_ND = torch.empty_like(x_ND, memory_format=torch.contiguous_format)
    dr_ND = r_ND = None
    if scaling is not None:
        r_ND = _rows(scaling[0])
        dr_ND = torch.empty_like(r_ND, memory_format=torch.contiguous_format)
    dz_ND = _rows(dz) if dz is not None else None
    cfg = launch_config("rms_norm_bwd", hidden, x.device, config)
    block_n = cfg.meta["BLOCK_N"]
    max_programs = max(1, cfg.host["programs_per_sm"] * multiprocessor_count(x.device))
    # Whole BLOCK_N tiles per program, so that no two programs share a row.
    rows_per_program = triton.cdiv(triton.cdiv(max(num_rows, 1), max_programs), block_n) * block_n
    num_programs = triton.cdiv(max(num_rows, 1), rows_per_program)
    part_4PD = torch.zeros((4, num_programs, hidden), device=x.device, dtype=torch.float32)
    if num_rows:
        vectors = scaling[1:] if scaling is not None else (weight,) * 4
        _rms_norm_bwd_kernel[(num_programs,)](
            dy_ND, dy_ND.stride(0),
            dz_ND if dz_ND is not None else dy_ND, dz_ND.stride(0) if dz_ND is not None else 0,
            x_ND, x_ND.stride(0),
            r_ND if r_ND is not None else x_ND, r_ND.stride(0) if r_ND is not None else 0,
            *vectors, weight, rstd_N,
            dx_ND, dx_ND.stride(0),
            dr_ND if dr_ND is not None else dx_ND, dr_ND.stride(0) if dr_ND is not None else 0,
            part_4PD,
            num_rows, hidden, rows_per_program,
            HAS_SCALING=scaling is not None, HAS_DZ=dz_ND is not None, BLOCK_N=block_n,
            BLOCK_D=triton.next_power_of_2(hidden), **cfg.options,
        )
    sums_4D = part_4PD.sum(1)
    return dx_ND.view(x.shape), (dr_ND.view(x.shape) if dr_ND is not None else None), sums_4D


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x / rms(x)) in one kernel each way; saves x and 1/rms (N floats)."""

    @staticmethod
    def forward(ctx, x, weight, eps, config=None):
        _, y, rstd_N = _forward(x, None, weight, eps, config)
        ctx.save_for_backward(x, weight, rstd_N)
        ctx.config = config
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd_N = ctx.saved_tensors
        dx, _, sums_4D = _backward(dy, None, x, None, weight, rstd_N, ctx.config)
        return dx, sums_4D[0].to(weight.dtype), None, None


class ResidualRMSNormFunction(torch.autograd.Function):
    """(z, y): z = (h + h_bias) * h_scale + (r + r_bias) * r_scale in fp32, y = weight * (z / rms(z)). Saves
    h, r and 1/rms; not z, which the backward recomputes. z's gradient from later layers joins the norm's."""

    @staticmethod
    def forward(ctx, hidden, residual, h_bias, h_scale, r_bias, r_scale, weight, eps, config=None):
        scaling = (residual, h_bias, h_scale, r_bias, r_scale)
        z, y, rstd_N = _forward(hidden, scaling, weight, eps, config)
        ctx.save_for_backward(hidden, residual, h_bias, h_scale, r_bias, r_scale, weight, rstd_N)
        ctx.config = config
        # An output nobody uses gets a None gradient, not a tensor of zeros (HAS_DZ=False skips the read).
        ctx.set_materialize_grads(False)
        return z, y

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, dy):
        hidden, residual, h_bias, h_scale, r_bias, r_scale, weight, rstd_N = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(hidden.shape, device=hidden.device, dtype=weight.dtype)
        scaling = (residual, h_bias, h_scale, r_bias, r_scale)
        dh, dr, sums_4D = _backward(dy, dz, hidden, scaling, weight, rstd_N, ctx.config)
        grad_sum_D = sums_4D[1]
        return (
            dh, dr,
            (grad_sum_D * h_scale).to(h_bias.dtype), sums_4D[2].to(h_scale.dtype),
            (grad_sum_D * r_scale).to(r_bias.dtype), sums_4D[3].to(r_scale.dtype),
            sums_4D[0].to(weight.dtype), None, None,
        )


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, config: dict | None = None) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32, the result in weight's dtype. `config`
    overrides the device's launch configuration (tests, tuning)."""
    if _needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps, config)
    return _forward(x, None, weight, eps, config)[1]


def residual_rms_norm(
    hidden: torch.Tensor, residual: torch.Tensor, h_bias: torch.Tensor, h_scale: torch.Tensor,
    r_bias: torch.Tensor, r_scale: torch.Tensor, weight: torch.Tensor, eps: float, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, rms_norm(z)) with z = (hidden + h_bias) * h_scale + (residual + r_bias) * r_scale in fp32."""
    tensors = (hidden, residual, h_bias, h_scale, r_bias, r_scale, weight)
    if _needs_grad(*tensors):
        return ResidualRMSNormFunction.apply(*tensors, eps, config)
    z, y, _ = _forward(hidden, (residual, h_bias, h_scale, r_bias, r_scale), weight, eps, config)
    return z, y
