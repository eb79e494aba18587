"""The q/k latent path of Compressed Convolutional Attention as Triton kernels: the composed causal convolution,
the "mean" skips and the QK L2-norm with the keys' `temp`, fused, forward and backward.

    q_BSQd, k_BSGd = cca_conv_qk(qk_pre_BSC, weight_CdT, bias_C, temp_G, layout.shift_valid_TBS, num_heads)

takes the q|k down-projection and returns what `ZayaQKNorm` returns (fp32, normalised to sqrt(d), keys times
`temp`). The PyTorch reference it must equal is the model's own path, which stays its `torch` path:
`ZayaCCAProjection.conv_with_skips` then `ZayaQKNorm` (zaya_train/model/cca.py; tests/kernels/test_cca.py
compares the two in outputs and gradients under TRITON_INTERPRET=1). `weight_CdT` / `bias_C` are the composed
conv (`ZayaCCAProjection.composed_conv`, which stays in PyTorch: the two original convs' gradients come from
autograd through it). Packed rows pass the layout's shift masks, and a tap that would reach into an earlier
document reads zero, as in the reference; plain rows pass None. Only calls without a decode cache take this
path: prefill into a cache and one-token decode steps stay on the reference (they must read and write the
cache's conv state, and a decode step is a few vectors, where a launch gains nothing).

Why fuse: the reference writes the conv output, the skips, their sum, the norm and its scaled copy as separate
[tokens, channels] tensors (in fp32 from the skips on), and its backward reads most of them again. The forward
kernel reads the projection once per tap (the taps hit the cache) and writes q and k; a conv group is one head,
so a program holding one head's [BLOCK_S, d] tile has everything its norm needs. The backward recomputes that
tile (a small GEMM per tap, cheaper than saving an fp32 copy of it per layer) for the norm's gradient du (fp32,
[B, S, C]), then runs the conv's transpose over du for the input gradient and a row-split reduction for the
weight and bias gradients: each program sums its rows' [d, d] products of one head and tap, and PyTorch adds
the few partials up, so no atomics and a deterministic result. As in the reference, the conv's operands are in
the input's dtype (the weight cast to it) with fp32 accumulation, its output is rounded to that dtype, and the
skips and norm run in fp32. The interpreter tests run fp32 only: Triton 3.9's interpreter multiplies bf16
`tl.dot` operands wrongly (compiled kernels are right), so bf16 is compared on a GPU, by `benchmarks/kernels.py`.

Layers: `_cca_fwd_kernel` / `_cca_bwd_norm_kernel` / `_cca_bwd_input_kernel` / `_cca_bwd_weight_kernel`
(Triton, the first two sharing `_conv_skip`), `_forward` / `_backward` (launchers: shape checks, launch configs
from `configs/<device>.json`, keyed by the head dim), `CCAConvQKFunction` (autograd), `cca_conv_qk` (what the
model calls).

Shape suffixes: B batch, S sequence, C conv channels (q + k latent), H conv groups = heads (Q query, then G KV),
d head dim (i in, o out), T taps, P backward programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from zaya_train.kernels.configs import launch_config, multiprocessor_count


@triton.jit
def _head_tile(ptr, row_off, head, cols, D, row_mask):
    """Channels `cols` of head `head` at element offsets `row_off` (one per row), [rows, cols]; 0 where masked."""
    mask = row_mask[:, None] & (cols < D)[None, :]
    return tl.load(ptr + row_off[:, None] + (head * D + cols)[None, :], mask=mask, other=0.0)


@triton.jit
def _tap_valid(valid_ptr, shift, flat_row, N, mask, HAS_MASK: tl.constexpr):
    """mask, and (packed rows) the input `shift` steps back from row b * S + s is in the same document."""
    if HAS_MASK:
        mask = mask & (tl.load(valid_ptr + shift * N + flat_row, mask=mask, other=0) != 0)
    return mask


@triton.jit
def _conv_skip(
    x_ptr, stride_xb, stride_xs, w_ptr, bias_ptr, valid_ptr, b, h, s, cols, S, N, Q, GROUP, D,
    HAS_MASK: tl.constexpr, TAPS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """u [BLOCK_S, BLOCK_D] fp32, the pre-norm q or k of head h at positions s of row b: the composed causal conv
    (rounded to x's dtype, as the reference's conv output) plus the head's mean skip."""
    s_mask = s < S
    col_mask = cols < D
    row_base = b.to(tl.int64) * stride_xb
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for j in range(TAPS):
        shift = TAPS - 1 - j  # tap j reads the input at s - (T - 1) + j
        mask = _tap_valid(valid_ptr, shift, b * S + s, N, s_mask & (s >= shift), HAS_MASK)
        src = row_base + (s - shift).to(tl.int64) * stride_xs
        # BLOCK_K input channels at a time: a whole [d, d] weight tile would not fit in registers.
        for k in range(0, BLOCK_D, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            x = _head_tile(x_ptr, src, h, ks, D, mask)
            w = tl.load(w_ptr + ((h * TAPS + j) * D + ks[:, None]) * D + cols[None, :],
                        mask=(ks < D)[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc, input_precision="ieee")
    bias = tl.load(bias_ptr + h * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    conv = (acc + bias[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    now = row_base + s.to(tl.int64) * stride_xs
    if h < Q:
        # A query head averages with its KV head.
        x_q = _head_tile(x_ptr, now, h, cols, D, s_mask).to(tl.float32)
        skip = 0.5 * (x_q + _head_tile(x_ptr, now, Q + h // GROUP, cols, D, s_mask).to(tl.float32))
    else:
        # A KV head takes the mean of its query heads' skips.
        x_k = _head_tile(x_ptr, now, h, cols, D, s_mask).to(tl.float32)
        skip = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for r in range(GROUP):
            skip += 0.5 * (_head_tile(x_ptr, now, (h - Q) * GROUP + r, cols, D, s_mask).to(tl.float32) + x_k)
        skip = skip / GROUP
    return conv + skip


@triton.jit
def _cca_fwd_kernel(
    # x [B, S, C] the q|k down-projection, unit stride over C, any float dtype.
    x_ptr, stride_xb, stride_xs,
    # w [H, T, d_i, d_o] the composed conv weight (cast to x's dtype), bias [C]; valid [T, B, S] uint8: row t
    # says the input t steps back is in the same document (row 0 all ones; the layout's masks; HAS_MASK only).
    w_ptr, bias_ptr, valid_ptr,
    # temp [G]; q [B, S, Q, d] and k [B, S, G, d] fp32, written.
    temp_ptr, q_ptr, k_ptr,
    S, N, H, Q, GROUP, D, scale, eps,
    HAS_MASK: tl.constexpr, TAPS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    u = _conv_skip(x_ptr, stride_xb, stride_xs, w_ptr, bias_ptr, valid_ptr, b, h, s, cols, S, N, Q, GROUP, D,
                   HAS_MASK, TAPS, BLOCK_S, BLOCK_D, BLOCK_K)
    y = u * (scale / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), eps))[:, None]
    mask = (s < S)[:, None] & (cols < D)[None, :]
    rows = (b * S + s).to(tl.int64)
    if h < Q:
        tl.store(q_ptr + (rows * Q + h)[:, None] * D + cols[None, :], y, mask=mask)
    else:
        temp = tl.load(temp_ptr + h - Q).to(tl.float32)
        tl.store(k_ptr + (rows * (H - Q) + h - Q)[:, None] * D + cols[None, :], y * temp, mask=mask)


@triton.jit
def _cca_bwd_norm_kernel(
    # As the forward: x, the conv, the shift masks, temp.
    x_ptr, stride_xb, stride_xs, w_ptr, bias_ptr, valid_ptr, temp_ptr,
    # dq [B, S, Q, d], dk [B, S, G, d] fp32 the gradients of the outputs.
    dq_ptr, dk_ptr,
    # du [B, S, C] fp32 the gradient of u (conv + skips), written; part [G, B * S blocks] fp32 this program's
    # share of d temp (KV heads only).
    du_ptr, part_ptr,
    S, N, H, Q, GROUP, D, scale, eps,
    HAS_MASK: tl.constexpr, TAPS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    u = _conv_skip(x_ptr, stride_xb, stride_xs, w_ptr, bias_ptr, valid_ptr, b, h, s, cols, S, N, Q, GROUP, D,
                   HAS_MASK, TAPS, BLOCK_S, BLOCK_D, BLOCK_K)
    norm = tl.sqrt(tl.sum(u * u, axis=1))
    clamped = tl.maximum(norm, eps)
    rnorm = scale / clamped
    s_mask = s < S
    rows = (b * S + s).to(tl.int64)
    if h < Q:
        dy = _head_tile(dq_ptr, rows * Q * D, h, cols, D, s_mask)
    else:
        dk = _head_tile(dk_ptr, rows * (H - Q) * D, h - Q, cols, D, s_mask)
        blocks = tl.num_programs(1)
        tl.store(part_ptr + ((h - Q) * (tl.num_programs(0) // H) + b) * blocks + tl.program_id(1),
                 tl.sum(tl.sum(dk * u * rnorm[:, None], axis=1), axis=0))
        dy = dk * tl.load(temp_ptr + h - Q).to(tl.float32)
    # d/du of scale * u / max(|u|, eps); below eps the clamp passes no gradient to |u|, as clamp_min's.
    proj = tl.where(norm >= eps, tl.sum(u * dy, axis=1) / (clamped * clamped), 0.0)
    du = rnorm[:, None] * (dy - proj[:, None] * u)
    mask = s_mask[:, None] & (cols < D)[None, :]
    tl.store(du_ptr + (rows * H * D + h * D)[:, None] + cols[None, :], du, mask=mask)


@triton.jit
def _cca_bwd_input_kernel(
    # du [B, S, C] fp32; w [H, T, d_i, d_o]; valid [T, B, S] uint8 (HAS_MASK).
    du_ptr, w_ptr, valid_ptr,
    # dx [B, S, C] in x's dtype, written: the conv's transpose over du plus the skips' gradients.
    dx_ptr,
    S, N, H, Q, GROUP, D,
    HAS_MASK: tl.constexpr, TAPS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    C = H * D
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for j in range(TAPS):
        shift = TAPS - 1 - j
        # Output s + shift read input s through tap j, unless its document starts after s.
        dst = b * S + s + shift
        mask = _tap_valid(valid_ptr, shift, dst, N, s + shift < S, HAS_MASK)
        for k in range(0, BLOCK_D, BLOCK_K):  # BLOCK_K output channels at a time, as the forward
            ks = k + tl.arange(0, BLOCK_K)
            g = _head_tile(du_ptr, dst.to(tl.int64) * C, h, ks, D, mask)
            w_oi = tl.load(w_ptr + ((h * TAPS + j) * D + cols[None, :]) * D + ks[:, None],
                           mask=(ks < D)[:, None] & col_mask[None, :], other=0.0)
            # In x's dtype, as the reference's conv backward gets its gradient (its output was cast to fp32).
            acc = tl.dot(g.to(dx_ptr.dtype.element_ty), w_oi.to(dx_ptr.dtype.element_ty), acc,
                         input_precision="ieee")
    s_mask = s < S
    now = (b * S + s).to(tl.int64) * C
    if h < Q:
        # x_q feeds its own skip and, through it, its KV head's mean.
        dx = 0.5 * (_head_tile(du_ptr, now, h, cols, D, s_mask)
                    + _head_tile(du_ptr, now, Q + h // GROUP, cols, D, s_mask) / GROUP)
    else:
        # x_k feeds its own skip and every query skip of its group.
        dx = 0.5 * _head_tile(du_ptr, now, h, cols, D, s_mask)
        for r in range(GROUP):
            dx += 0.5 * _head_tile(du_ptr, now, (h - Q) * GROUP + r, cols, D, s_mask)
    mask = s_mask[:, None] & col_mask[None, :]
    tl.store(dx_ptr + (now + h * D)[:, None] + cols[None, :], (acc + dx).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cca_bwd_weight_kernel(
    # du [B, S, C] fp32; x [B, S, C] as the forward's; valid [T, B, S] uint8 (HAS_MASK).
    du_ptr, x_ptr, stride_xb, stride_xs, valid_ptr,
    # part_w [P, H, T, d_o, d_i] fp32: this program's rows' sum of du_o * x_i for its head and tap;
    # part_b [P, C] fp32: the sum of du (written by the shift-0 tap's programs).
    part_w_ptr, part_b_ptr,
    S, N, H, D, rows_per_program,
    HAS_MASK: tl.constexpr, TAPS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    shift = TAPS - 1 - j
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_begin = pid * rows_per_program
    for start in range(row_begin, row_begin + rows_per_program, BLOCK_S):
        n = start + tl.arange(0, BLOCK_S)  # rows of the flattened [B * S]
        n_mask = n < N
        s = n % S
        mask = _tap_valid(valid_ptr, shift, n, N, n_mask & (s >= shift), HAS_MASK)
        g = _head_tile(du_ptr, n.to(tl.int64) * H * D, h, cols, D, n_mask)
        x = _head_tile(x_ptr, (n // S).to(tl.int64) * stride_xb + (s - shift).to(tl.int64) * stride_xs, h, cols, D,
                       mask)
        acc = tl.dot(tl.trans(g.to(x_ptr.dtype.element_ty)), x, acc, input_precision="ieee")
        acc_b += tl.sum(g, axis=0)
    tl.store(part_w_ptr + (((pid * H + h) * TAPS + j) * D + cols[:, None]) * D + cols[None, :], acc,
             mask=col_mask[:, None] & col_mask[None, :])
    if j == TAPS - 1:
        tl.store(part_b_ptr + pid * H * D + h * D + cols, acc_b, mask=col_mask)


def _check(x_BSC: torch.Tensor, weight_CdT: torch.Tensor, bias_C: torch.Tensor, temp_G: torch.Tensor,
           num_heads: int) -> None:
    if x_BSC.ndim != 3 or weight_CdT.ndim != 3:
        raise ValueError(f"cca_conv_qk: x [B, S, C] and weight [C, d, T] expected, got {tuple(x_BSC.shape)} and "
                         f"{tuple(weight_CdT.shape)}")
    channels, head_dim = x_BSC.shape[2], weight_CdT.shape[1]
    num_kv_heads = temp_G.numel()
    if (weight_CdT.shape[0] != channels or bias_C.shape != (channels,)
            or channels != (num_heads + num_kv_heads) * head_dim):
        raise ValueError(f"cca_conv_qk: x {tuple(x_BSC.shape)}, weight {tuple(weight_CdT.shape)}, bias "
                         f"{tuple(bias_C.shape)} do not make ({num_heads} + {num_kv_heads}) heads of {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"cca_conv_qk: {num_heads} query heads do not split over {num_kv_heads} KV heads")


def _block_d(head_dim: int) -> int:
    """A whole head per program; at least 16, tl.dot's smallest tile side on GPUs."""
    return max(16, triton.next_power_of_2(head_dim))


def _weight_HTio(weight_CdT: torch.Tensor, groups: int) -> torch.Tensor:
    """[C, d, T] (channel h * d + o, input i, tap) as [H, T, d_i, d_o]: one contiguous [d, d] matrix per tap."""
    _, head_dim, taps = weight_CdT.shape
    return weight_CdT.view(groups, head_dim, head_dim, taps).permute(0, 3, 2, 1).contiguous()


def _forward(
    x_BSC: torch.Tensor, weight_CdT: torch.Tensor, bias_C: torch.Tensor, temp_G: torch.Tensor,
    valid_TBS: torch.Tensor | None, num_heads: int, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, S, Q, d], k [B, S, G, d]) fp32; `valid_TBS` the shift masks (uint8, shift 0 first) or None."""
    batch, seq_len, channels = x_BSC.shape
    _, head_dim, taps = weight_CdT.shape
    groups, num_kv_heads = channels // head_dim, temp_G.numel()
    q_BSQd = torch.empty(batch, seq_len, num_heads, head_dim, device=x_BSC.device, dtype=torch.float32)
    k_BSGd = torch.empty(batch, seq_len, num_kv_heads, head_dim, device=x_BSC.device, dtype=torch.float32)
    if batch * seq_len:
        cfg = launch_config("cca_fwd", head_dim, x_BSC.device, config)
        block_s = cfg.meta["BLOCK_S"]
        _cca_fwd_kernel[(batch * groups, triton.cdiv(seq_len, block_s))](
            x_BSC, x_BSC.stride(0), x_BSC.stride(1),
            _weight_HTio(weight_CdT, groups), bias_C, valid_TBS if valid_TBS is not None else x_BSC,
            temp_G, q_BSQd, k_BSGd,
            seq_len, batch * seq_len, groups, num_heads, num_heads // num_kv_heads, head_dim, head_dim**0.5,
            torch.finfo(torch.float32).eps,
            HAS_MASK=valid_TBS is not None, TAPS=taps, BLOCK_D=_block_d(head_dim), **cfg.meta,
            **cfg.options,
        )
    return q_BSQd, k_BSGd


def _backward(
    dq_BSQd: torch.Tensor, dk_BSGd: torch.Tensor, x_BSC: torch.Tensor, weight_CdT: torch.Tensor,
    bias_C: torch.Tensor, temp_G: torch.Tensor, valid_TBS: torch.Tensor | None, num_heads: int,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [B, S, C] in x's dtype, d weight [C, d, T], d bias [C], d temp [G]: fp32 sums)."""
    batch, seq_len, channels = x_BSC.shape
    _, head_dim, taps = weight_CdT.shape
    groups, num_kv_heads = channels // head_dim, temp_G.numel()
    num_rows, group = batch * seq_len, num_heads // num_kv_heads
    device = x_BSC.device
    w_HTio = _weight_HTio(weight_CdT, groups)
    valid = valid_TBS if valid_TBS is not None else x_BSC
    has_mask, block_d = valid_TBS is not None, _block_d(head_dim)
    dq_BSQd, dk_BSGd = dq_BSQd.float().contiguous(), dk_BSGd.float().contiguous()
    du_BSC = torch.empty(batch, seq_len, channels, device=device, dtype=torch.float32)
    dx_BSC = torch.empty(batch, seq_len, channels, device=device, dtype=x_BSC.dtype)

    cfg = launch_config("cca_bwd_norm", head_dim, device, config)
    blocks = triton.cdiv(seq_len, cfg.meta["BLOCK_S"])
    part_temp_GP = torch.zeros(num_kv_heads, batch * blocks, device=device, dtype=torch.float32)
    if num_rows:
        _cca_bwd_norm_kernel[(batch * groups, blocks)](
            x_BSC, x_BSC.stride(0), x_BSC.stride(1), w_HTio, bias_C, valid, temp_G,
            dq_BSQd, dk_BSGd, du_BSC, part_temp_GP,
            seq_len, num_rows, groups, num_heads, group, head_dim, head_dim**0.5, torch.finfo(torch.float32).eps,
            HAS_MASK=has_mask, TAPS=taps, BLOCK_D=block_d, **cfg.meta, **cfg.options,
        )
        cfg = launch_config("cca_bwd_input", head_dim, device, config)
        _cca_bwd_input_kernel[(batch * groups, triton.cdiv(seq_len, cfg.meta["BLOCK_S"]))](
            du_BSC, w_HTio, valid, dx_BSC,
            seq_len, num_rows, groups, num_heads, group, head_dim,
            HAS_MASK=has_mask, TAPS=taps, BLOCK_D=block_d, **cfg.meta, **cfg.options,
        )

    cfg = launch_config("cca_bwd_weight", head_dim, device, config)
    block_s = cfg.meta["BLOCK_S"]
    # Row chunks per (head, tap) so that the whole grid is about programs_per_sm programs per CU/SM; whole
    # BLOCK_S tiles per program, so that no two programs share a row.
    chunks = max(1, triton.cdiv(cfg.host["programs_per_sm"] * multiprocessor_count(device), groups * taps))
    rows_per_program = triton.cdiv(triton.cdiv(max(num_rows, 1), chunks), block_s) * block_s
    chunks = triton.cdiv(max(num_rows, 1), rows_per_program)
    part_w_PHToi = torch.zeros(chunks, groups, taps, head_dim, head_dim, device=device, dtype=torch.float32)
    part_b_PC = torch.zeros(chunks, channels, device=device, dtype=torch.float32)
    if num_rows:
        _cca_bwd_weight_kernel[(chunks, groups, taps)](
            du_BSC, x_BSC, x_BSC.stride(0), x_BSC.stride(1), valid, part_w_PHToi, part_b_PC,
            seq_len, num_rows, groups, head_dim, rows_per_program,
            HAS_MASK=has_mask, TAPS=taps, BLOCK_S=block_s, BLOCK_D=block_d, **cfg.options,
        )
    d_weight_CdT = part_w_PHToi.sum(0).permute(0, 2, 3, 1).reshape(channels, head_dim, taps)
    return dx_BSC, d_weight_CdT, part_b_PC.sum(0), part_temp_GP.sum(1)


class CCAConvQKFunction(torch.autograd.Function):
    """(q, k) = QK-norm(conv(x) + skips(x)) with keys times temp; saves x (a view of the projection output) and
    the parameters, not the fp32 intermediates, which the backward recomputes."""

    @staticmethod
    def forward(ctx, x_BSC, weight_CdT, bias_C, temp_G, valid_TBS, num_heads, config=None):
        q_BSQd, k_BSGd = _forward(x_BSC, weight_CdT, bias_C, temp_G, valid_TBS, num_heads, config)
        ctx.save_for_backward(x_BSC, weight_CdT, bias_C, temp_G, valid_TBS)
        ctx.num_heads, ctx.config = num_heads, config
        return q_BSQd, k_BSGd

    @staticmethod
    @once_differentiable
    def backward(ctx, dq_BSQd, dk_BSGd):
        x_BSC, weight_CdT, bias_C, temp_G, valid_TBS = ctx.saved_tensors
        dx_BSC, d_weight, d_bias, d_temp = _backward(
            dq_BSQd, dk_BSGd, x_BSC, weight_CdT, bias_C, temp_G, valid_TBS, ctx.num_heads, ctx.config
        )
        return dx_BSC, d_weight.to(weight_CdT.dtype), d_bias.to(bias_C.dtype), d_temp.to(temp_G.dtype), None, None, None


def cca_conv_qk(
    qk_pre_BSC: torch.Tensor, weight_CdT: torch.Tensor, bias_C: torch.Tensor, temp_G: torch.Tensor,
    shift_valid_TBS: list[torch.Tensor] | None, num_heads: int, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised q [B, S, Q, d] and k [B, S, G, d] (fp32) from the q|k down-projection [B, S, C] (query heads'
    channels first), the composed conv weight [C, d, T] and bias [C], the keys' temp [G] and the layout's shift
    masks (`SequenceLayout.shift_valid_TBS`, None for plain rows); `config` overrides the launch configs."""
    _check(qk_pre_BSC, weight_CdT, bias_C, temp_G, num_heads)
    if qk_pre_BSC.stride(-1) != 1:
        qk_pre_BSC = qk_pre_BSC.contiguous()
    taps = weight_CdT.shape[2]
    valid_TBS = None
    if shift_valid_TBS is not None and taps > 1:
        if len(shift_valid_TBS) < taps - 1:
            raise ValueError(f"cca_conv_qk: {taps} taps need {taps - 1} shift masks, got {len(shift_valid_TBS)}")
        # Shift 0 (always the same document) gets a row too, so that the kernels index by shift alone.
        same_BS = torch.ones_like(shift_valid_TBS[0])
        valid_TBS = torch.stack([same_BS, *shift_valid_TBS[: taps - 1]]).to(torch.uint8)
    return CCAConvQKFunction.apply(qk_pre_BSC, weight_CdT, bias_C, temp_G, valid_TBS, num_heads, config)
