"""ZAYA1's top-1 dropless SwiGLU experts as Triton kernels: the permutation by expert, grouped GEMMs over each
expert's contiguous slice with SwiGLU and the weighted unpermute fused into their epilogues, and the backward.

    y_ND = moe_experts(x_ND, ids_N, weight_N, gate_up_EFD, down_EDF)   # == ZayaExperts.forward
    order_N, offsets_E1 = permute(ids_N, num_experts)                   # argsort(ids, stable), cumsum(counts)

ids_N lies in [0, E]; E is the skip class, which runs through expert 0 with weight 0 (output 0, no gradient),
as in the model. gate_up_EFD is [E, 2F, D] with the gate rows first and down_EDF [E, D, F] (HF's layout); x and
both weights share one dtype, the routing weight may be another (the router's fp32).

The PyTorch reference this must equal is `ZayaExperts.forward` (zaya_train/model/moe.py), which stays the
model's `torch` path; HF's per-expert loop `reference_experts` there is the second oracle
(tests/kernels/test_moe.py runs both against these kernels under TRITON_INTERPRET=1).

How, with no host sync (shapes never depend on the routing) and no atomics (deterministic results):
1. permutation: `_expert_counts_kernel` counts the tokens of each expert in each block of BLOCK_T tokens;
   `_expert_offsets_kernel` (one program) scans those counts into the expert offsets and each block's first
   slot per expert; `_token_slots_kernel` ranks each token among the earlier tokens of its expert in its block
   and writes order[slot] = token, the order of a stable argsort.
2. forward GEMMs over tiles of BLOCK_M permuted rows, each tile inside one expert's slice (a program finds its
   expert from the offsets; the grid is N // BLOCK_M + E tiles, an upper bound, and spare programs return):
   `_gate_up_kernel` gathers x's rows through the order (no permuted copy of x), multiplies them by the gate
   and the up rows of gate_up at once and writes silu(gate) * up; `_down_kernel` multiplies that by down, and
   its epilogue scales each row by its routing weight and stores it at its token's row: the unpermute. Top-1
   routing writes every output row exactly once.
3. backward: `_down_bwd_kernel` forms dy @ down for the permuted rows and fuses the SwiGLU backward and the
   routing weight's gradient into its epilogue (d weight = <dy, y> = <dy @ down, silu(gate) * up>, so the
   expert outputs y need not be kept); `_down_kernel` again gives dx = d(gate, up) @ gate_up, scattered to
   token order; `_expert_wgrad_kernel` walks each expert's rows for d gate_up = d(gate, up)^T x and
   d down = (weight * dy)^T (silu(gate) * up).

The pre-activations (gate, up) are saved for the backward, not recomputed: recomputing them is a GEMM as large
as the forward's first, and the reference keeps them too. silu(gate) * up is elementwise, so it is recomputed
where the backward reads it rather than kept (N x F less memory). The kernels round gate and up to the compute
dtype before the activation, as the reference's GEMM output is rounded, so that forward and backward see the
same values; the GEMMs accumulate in fp32 (`input_precision="ieee"`: fp32 inputs are not truncated to tf32).

Layers: the kernels above (Triton), `permute` / `_gate_up` / `_down` / `_down_bwd` / `_wgrad` (launchers:
launch configs from `configs/<device>.json`, keyed by the hidden size), `MoEExpertsFunction` (autograd),
`moe_experts` (what the model calls).

Shape suffixes: N tokens (also permuted rows, one per token), D hidden, F expert intermediate, E experts,
E1 = E + 1 offsets, B blocks of BLOCK_T tokens, P column tiles of the F dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from zaya_train.kernels.configs import launch_config


@triton.jit
def _expert_counts_kernel(
    # ids [N] int64 in [0, E]; counts [B, E] int32: each block's tokens per expert.
    ids_ptr, counts_ptr, N, E,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + tokens, mask=tokens < N, other=-1)
    ids = tl.where(ids == E, 0, ids)  # the skip class runs through expert 0
    onehot_TE = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + block * E + experts, tl.sum(onehot_TE, axis=0), mask=experts < E)


@triton.jit
def _expert_offsets_kernel(
    # counts [B, E] int32 (from `_expert_counts_kernel`); first [B, E] int32: the slot of each block's first
    # token of each expert; offsets [E + 1] int32: where each expert's rows begin, then N.
    counts_ptr, first_ptr, offsets_ptr, num_blocks, E,
    BLOCK_E: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    mask = experts < E
    total_E = tl.zeros([BLOCK_E], dtype=tl.int32)
    for block in range(num_blocks):
        total_E += tl.load(counts_ptr + block * E + experts, mask=mask, other=0)
    offsets_E = tl.cumsum(total_E, axis=0) - total_E
    tl.store(offsets_ptr + experts, offsets_E, mask=mask)
    tl.store(offsets_ptr + E, tl.sum(total_E, axis=0))
    for block in range(num_blocks):
        tl.store(first_ptr + block * E + experts, offsets_E, mask=mask)
        offsets_E += tl.load(counts_ptr + block * E + experts, mask=mask, other=0)


@triton.jit
def _token_slots_kernel(
    # ids [N] int64; first [B, E] int32 (from `_expert_offsets_kernel`); order [N] int32: the token at each
    # permuted slot.
    ids_ptr, first_ptr, order_ptr, N, E,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = tokens < N
    experts = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + tokens, mask=mask, other=-1)
    ids = tl.where(ids == E, 0, ids)
    onehot_TE = (ids[:, None] == experts[None, :]).to(tl.int32)
    # Earlier tokens of the same expert in this block, so that slots keep token order within an expert.
    rank = tl.sum((tl.cumsum(onehot_TE, axis=0) - onehot_TE) * onehot_TE, axis=1)
    first_E = tl.load(first_ptr + block * E + experts, mask=experts < E, other=0)
    slots = tl.sum(onehot_TE * first_E[None, :], axis=1) + rank
    tl.store(order_ptr + slots, tokens, mask=mask)


@triton.jit
def _expert_tile(offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, the expert's end row) of this program's tile of permuted rows; past the last tile,
    first row >= end row."""
    pid = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    mask = experts < E
    starts_E = tl.load(offsets_ptr + experts, mask=mask, other=0)
    ends_E = tl.load(offsets_ptr + experts + 1, mask=mask, other=0)
    tiles_E = (ends_E - starts_E + BLOCK_M - 1) // BLOCK_M
    tiles_through_E = tl.cumsum(tiles_E, axis=0)
    # Experts whose tiles all come before this one; padding lanes have no tiles and never count.
    expert = tl.sum((tiles_through_E <= pid).to(tl.int32), axis=0)
    this_E = experts == expert
    first_tile = tl.sum(tl.where(this_E, tiles_through_E - tiles_E, 0), axis=0)
    row = tl.sum(tl.where(this_E, starts_E, 0), axis=0) + (pid - first_tile) * BLOCK_M
    return expert, row, tl.sum(tl.where(this_E, ends_E, 0), axis=0)


@triton.jit
def _routing_weight(weight_ptr, ids_ptr, tokens, mask, E):
    """(weight fp32, routed): each token's routing weight, 0 for the skip class, and whether it is routed."""
    routed = tl.load(ids_ptr + tokens, mask=mask, other=E) != E
    weight = tl.load(weight_ptr + tokens, mask=mask, other=0.0).to(tl.float32)
    return tl.where(routed, weight, 0.0), routed


@triton.jit
def _swiglu(gate, up):
    """silu(gate) * up in fp32 from compute-dtype inputs, silu rounded to that dtype as the reference's is."""
    gate32 = gate.to(tl.float32)
    silu = (gate32 * tl.sigmoid(gate32)).to(gate.dtype)
    return silu.to(tl.float32) * up.to(tl.float32)


@triton.jit
def _gate_up_kernel(
    # x [N, D] in token order; order [N] int32, offsets [E + 1] int32 (from `permute`).
    x_ptr, stride_x, order_ptr, offsets_ptr,
    # gate_up [E, 2F, D], unit stride along D.
    w_ptr, stride_we, stride_wf,
    # act [N, F] permuted: silu(gate) * up; h [N, 2F] permuted: (gate, up), for the backward (SAVE_H).
    act_ptr, stride_act, h_ptr, stride_h,
    D, F, E,
    SAVE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    expert, row, end = _expert_tile(offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row >= end:
        return
    rows = row + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    tokens = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    w_gate = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wf
    w_up = w_gate + F * stride_wf
    # One pass over x for both halves: each x tile is loaded once for the gate and the up columns.
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        x = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        acc_gate = tl.dot(x, tl.load(w_gate + ks[:, None], mask=w_mask, other=0.0), acc_gate,
                          input_precision="ieee")
        acc_up = tl.dot(x, tl.load(w_up + ks[:, None], mask=w_mask, other=0.0), acc_up, input_precision="ieee")
    gate = acc_gate.to(act_ptr.dtype.element_ty)
    up = acc_up.to(act_ptr.dtype.element_ty)
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    if SAVE_H:
        tl.store(h_ptr + rows64 * stride_h + cols[None, :], gate, mask=mask)
        tl.store(h_ptr + rows64 * stride_h + F + cols[None, :], up, mask=mask)
    act = _swiglu(gate, up).to(act_ptr.dtype.element_ty)
    tl.store(act_ptr + rows64 * stride_act + cols[None, :], act, mask=mask)


@triton.jit
def _down_kernel(
    # a [N, K] permuted: silu(gate) * up (K = F) in the forward, d(gate, up) (K = 2F) for dx.
    a_ptr, stride_a, order_ptr, offsets_ptr,
    # w: per expert [K, D] by strides: down transposed (forward), gate_up (dx).
    w_ptr, stride_we, stride_wk, stride_wd,
    # weight [N] (any float dtype), ids [N] int64 (HAS_WEIGHT: the forward); out [N, D] in token order.
    weight_ptr, ids_ptr, out_ptr, stride_out,
    K, D, E,
    HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    expert, row, end = _expert_tile(offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row >= end:
        return
    rows = row + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_a + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    tokens = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_WEIGHT:
        weight, _ = _routing_weight(weight_ptr, ids_ptr, tokens, row_mask, E)
        # As the reference: the expert output times the weight cast to its dtype, rounded once (a product of
        # two bf16 numbers is exact in fp32).
        weight = weight.to(out_ptr.dtype.element_ty).to(tl.float32)
        out = (out.to(tl.float32) * weight[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], out,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_bwd_kernel(
    # dy [N, D] the output's gradient in token order; order [N], offsets [E + 1].
    dy_ptr, stride_dy, order_ptr, offsets_ptr,
    # down [E, D, F], unit stride along F; h [N, 2F] permuted (gate, up) from the forward.
    w_ptr, stride_we, stride_wd, h_ptr, stride_h,
    # weight [N], ids [N] int64; dh [N, 2F] permuted: d(gate, up).
    weight_ptr, ids_ptr, dh_ptr, stride_dh,
    # dweight [N, P] fp32 in token order: each column tile's share of d weight = <dy @ down, act>.
    dweight_ptr, stride_dweight,
    D, F, E,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    expert, row, end = _expert_tile(offsets_ptr, E, BLOCK_M, BLOCK_E)
    if row >= end:
        return
    rows = row + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    tokens = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :]
    # d act before the routing weight: dy @ down[expert], [BLOCK_M, BLOCK_N] over F.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        dy = tl.load(dy_ptr + tokens[:, None] * stride_dy + ks[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wd, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision="ieee")
    mask = row_mask[:, None] & col_mask[None, :]
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    gate = tl.load(h_rows, mask=mask, other=0.0)
    up = tl.load(h_rows + F, mask=mask, other=0.0)
    weight, routed = _routing_weight(weight_ptr, ids_ptr, tokens, row_mask, E)
    # Padding rows and columns have gate = up = 0, so they add nothing.
    dweight = tl.where(routed, tl.sum(acc * _swiglu(gate, up), axis=1), 0.0)
    tl.store(dweight_ptr + tokens * stride_dweight + tile, dweight, mask=row_mask)
    dact = acc * weight[:, None]
    gate32 = gate.to(tl.float32)
    sig = tl.sigmoid(gate32)
    silu = (gate32 * sig).to(gate.dtype).to(tl.float32)
    dgate = dact * up.to(tl.float32) * sig * (1.0 + gate32 * (1.0 - sig))
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + cols[None, :]
    tl.store(dh_rows, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_rows + F, (dact * silu).to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_wgrad_kernel(
    # p [N, M]: d(gate, up) permuted (M = 2F), or with DOWN dy in token order (M = D).
    p_ptr, stride_p,
    # q [N, K]: x in token order (K = D), or with DOWN the permuted (gate, up) [N, 2F] (K = F).
    q_ptr, stride_q,
    # order [N], offsets [E + 1]; weight [N], ids [N] (DOWN: dy is weighted per token).
    order_ptr, offsets_ptr, weight_ptr, ids_ptr,
    # dw [E, M, K]: d gate_up [E, 2F, D], or with DOWN d down [E, D, F]; unit stride along K.
    dw_ptr, stride_dwe, stride_dwm,
    M, K, E,
    DOWN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < K
    # The expert's rows are the reduction dimension: an expert with no tokens writes zeros.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for row in range(start, end, BLOCK_K):
        rows = row + tl.arange(0, BLOCK_K)
        row_mask = rows < end
        tokens = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        p_mask = m_mask[:, None] & row_mask[None, :]
        q_mask = row_mask[:, None] & n_mask[None, :]
        if DOWN:
            p = tl.load(p_ptr + tokens[None, :] * stride_p + ms[:, None], mask=p_mask, other=0.0)
            weight, _ = _routing_weight(weight_ptr, ids_ptr, tokens, row_mask, E)
            # The reference's gradient of the expert output: dy times the weight, in dy's dtype.
            weight = weight.to(p_ptr.dtype.element_ty).to(tl.float32)
            p = (p.to(tl.float32) * weight[None, :]).to(p_ptr.dtype.element_ty)
            h_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q + ns[None, :]
            gate = tl.load(h_rows, mask=q_mask, other=0.0)
            up = tl.load(h_rows + K, mask=q_mask, other=0.0)
            q = _swiglu(gate, up).to(q_ptr.dtype.element_ty)
        else:
            p = tl.load(p_ptr + rows.to(tl.int64)[None, :] * stride_p + ms[:, None], mask=p_mask, other=0.0)
            q = tl.load(q_ptr + tokens[:, None] * stride_q + ns[None, :], mask=q_mask, other=0.0)
        acc = tl.dot(p, q, acc, input_precision="ieee")
    tl.store(dw_ptr + expert.to(tl.int64) * stride_dwe + ms[:, None] * stride_dwm + ns[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_e(num_experts: int) -> int:
    return triton.next_power_of_2(num_experts)


def permute(
    ids_N: torch.Tensor, num_experts: int, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_N int32: the token at each permuted slot, stably sorted by expert; offsets_E1 int32: where each
    expert's slots begin, then N). Skip-class ids (== num_experts) count as expert 0."""
    num_tokens = ids_N.shape[0]
    device = ids_N.device
    order_N = torch.empty(num_tokens, device=device, dtype=torch.int32)
    offsets_E1 = torch.zeros(num_experts + 1, device=device, dtype=torch.int32)
    if num_tokens == 0:
        return order_N, offsets_E1
    block_t = launch_config("moe_permute", num_tokens, device, config).meta["BLOCK_T"]
    num_blocks = triton.cdiv(num_tokens, block_t)
    counts_BE = torch.empty((num_blocks, num_experts), device=device, dtype=torch.int32)
    first_BE = torch.empty_like(counts_BE)
    block_e = _block_e(num_experts)
    _expert_counts_kernel[(num_blocks,)](ids_N, counts_BE, num_tokens, num_experts, BLOCK_T=block_t,
                                         BLOCK_E=block_e)
    _expert_offsets_kernel[(1,)](counts_BE, first_BE, offsets_E1, num_blocks, num_experts, BLOCK_E=block_e)
    _token_slots_kernel[(num_blocks,)](ids_N, first_BE, order_N, num_tokens, num_experts, BLOCK_T=block_t,
                                       BLOCK_E=block_e)
    return order_N, offsets_E1


def _tiles(cfg) -> dict[str, int]:
    """A GEMM's tile sizes from its launch config (an override may carry other kernels' keys too)."""
    return {name: cfg.meta[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}


def _row_tiles(num_tokens: int, num_experts: int, block_m: int) -> int:
    """Tiles of block_m permuted rows, each inside one expert, at most: a partial tile per expert."""
    return num_tokens // block_m + num_experts


def _gate_up(
    x_ND: torch.Tensor, order_N: torch.Tensor, offsets_E1: torch.Tensor, gate_up_EFD: torch.Tensor,
    save_h: bool, config: dict | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act_NF = silu(gate) * up, permuted; h_NF2 = (gate, up) permuted, or None without save_h)."""
    num_tokens, hidden = x_ND.shape
    num_experts, ffn = gate_up_EFD.shape[0], gate_up_EFD.shape[1] // 2
    act_NF = torch.empty((num_tokens, ffn), device=x_ND.device, dtype=x_ND.dtype)
    h_NF2 = torch.empty((num_tokens, 2 * ffn), device=x_ND.device, dtype=x_ND.dtype) if save_h else None
    cfg = launch_config("moe_gate_up", hidden, x_ND.device, config)
    grid = (_row_tiles(num_tokens, num_experts, cfg.meta["BLOCK_M"]), triton.cdiv(ffn, cfg.meta["BLOCK_N"]))
    _gate_up_kernel[grid](
        x_ND, x_ND.stride(0), order_N, offsets_E1,
        gate_up_EFD, gate_up_EFD.stride(0), gate_up_EFD.stride(1),
        act_NF, act_NF.stride(0), h_NF2 if save_h else act_NF, h_NF2.stride(0) if save_h else 0,
        hidden, ffn, num_experts,
        SAVE_H=save_h, BLOCK_E=_block_e(num_experts), **_tiles(cfg), **cfg.options,
    )
    return act_NF, h_NF2


def _down(
    a_NK: torch.Tensor, order_N: torch.Tensor, offsets_E1: torch.Tensor, w_EKD: torch.Tensor,
    routing: tuple[torch.Tensor, torch.Tensor] | None, config: dict | None,
) -> torch.Tensor:
    """out_ND in token order: each permuted row of a_NK times its expert's w_EKD (a strided view), times the
    token's routing weight where `routing` = (weight_N, ids_N) is given."""
    num_tokens, inner = a_NK.shape
    num_experts, _, hidden = w_EKD.shape
    out_ND = torch.empty((num_tokens, hidden), device=a_NK.device, dtype=a_NK.dtype)
    cfg = launch_config("moe_down", hidden, a_NK.device, config)
    grid = (_row_tiles(num_tokens, num_experts, cfg.meta["BLOCK_M"]), triton.cdiv(hidden, cfg.meta["BLOCK_N"]))
    weight_N, ids_N = routing if routing is not None else (order_N, order_N)  # unread without HAS_WEIGHT
    _down_kernel[grid](
        a_NK, a_NK.stride(0), order_N, offsets_E1,
        w_EKD, w_EKD.stride(0), w_EKD.stride(1), w_EKD.stride(2),
        weight_N, ids_N, out_ND, out_ND.stride(0),
        inner, hidden, num_experts,
        HAS_WEIGHT=routing is not None, BLOCK_E=_block_e(num_experts), **_tiles(cfg), **cfg.options,
    )
    return out_ND


def _down_bwd(
    dy_ND: torch.Tensor, order_N: torch.Tensor, offsets_E1: torch.Tensor, down_EDF: torch.Tensor,
    h_NF2: torch.Tensor, weight_N: torch.Tensor, ids_N: torch.Tensor, config: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh_NF2 = d(gate, up) permuted, dweight_N fp32 in token order, 0 for the skip class)."""
    num_tokens, hidden = dy_ND.shape
    num_experts, _, ffn = down_EDF.shape
    cfg = launch_config("moe_down_bwd", hidden, dy_ND.device, config)
    tiles_f = triton.cdiv(ffn, cfg.meta["BLOCK_N"])
    dh_NF2 = torch.empty_like(h_NF2)
    # Per column tile partial sums, added up below: every (token, tile) is written once, no atomics.
    dweight_NP = torch.empty((num_tokens, tiles_f), device=dy_ND.device, dtype=torch.float32)
    grid = (_row_tiles(num_tokens, num_experts, cfg.meta["BLOCK_M"]), tiles_f)
    _down_bwd_kernel[grid](
        dy_ND, dy_ND.stride(0), order_N, offsets_E1,
        down_EDF, down_EDF.stride(0), down_EDF.stride(1), h_NF2, h_NF2.stride(0),
        weight_N, ids_N, dh_NF2, dh_NF2.stride(0), dweight_NP, dweight_NP.stride(0),
        hidden, ffn, num_experts,
        BLOCK_E=_block_e(num_experts), **_tiles(cfg), **cfg.options,
    )
    return dh_NF2, dweight_NP.sum(1)


def _wgrad(
    p_NM: torch.Tensor, q_NK: torch.Tensor, order_N: torch.Tensor, offsets_E1: torch.Tensor,
    weight_N: torch.Tensor, ids_N: torch.Tensor, like_EMK: torch.Tensor, down: bool, config: dict | None,
) -> torch.Tensor:
    """The gradient of an expert weight shaped and typed like `like_EMK`: d gate_up from (d(gate, up), x), or
    with `down` d down from (dy, (gate, up))."""
    num_experts, rows, cols = like_EMK.shape
    dw_EMK = torch.empty(like_EMK.shape, device=like_EMK.device, dtype=like_EMK.dtype)
    cfg = launch_config("moe_wgrad", like_EMK.shape[1 if down else 2], like_EMK.device, config)
    grid = (num_experts, triton.cdiv(rows, cfg.meta["BLOCK_M"]), triton.cdiv(cols, cfg.meta["BLOCK_N"]))
    _expert_wgrad_kernel[grid](
        p_NM, p_NM.stride(0), q_NK, q_NK.stride(0), order_N, offsets_E1, weight_N, ids_N,
        dw_EMK, dw_EMK.stride(0), dw_EMK.stride(1),
        rows, cols, num_experts,
        DOWN=down, **_tiles(cfg), **cfg.options,
    )
    return dw_EMK


def _check(x_ND, ids_N, weight_N, gate_up_EFD, down_EDF) -> None:
    num_tokens, hidden = x_ND.shape
    num_experts, ffn2, _ = gate_up_EFD.shape
    if gate_up_EFD.shape != (num_experts, ffn2, hidden) or ffn2 % 2:
        raise ValueError(f"moe_experts: gate_up has shape {tuple(gate_up_EFD.shape)}, expected (E, 2F, {hidden})")
    if down_EDF.shape != (num_experts, hidden, ffn2 // 2):
        raise ValueError(f"moe_experts: down has shape {tuple(down_EDF.shape)}, expected "
                         f"({num_experts}, {hidden}, {ffn2 // 2})")
    if ids_N.shape != (num_tokens,) or weight_N.shape != (num_tokens,):
        raise ValueError(f"moe_experts: ids {tuple(ids_N.shape)} and weight {tuple(weight_N.shape)} must be "
                         f"({num_tokens},)")
    if not x_ND.dtype == gate_up_EFD.dtype == down_EDF.dtype:
        raise TypeError(f"moe_experts: x, gate_up and down must share a dtype, got {x_ND.dtype}, "
                        f"{gate_up_EFD.dtype}, {down_EDF.dtype}")


class MoEExpertsFunction(torch.autograd.Function):
    """y = sum over the token's expert of weight * down(silu(gate) * up). Saves x, the routing, the weights and
    the permuted (gate, up) [N, 2F]; not the expert outputs or the activation, which the backward does
    without or recomputes."""

    @staticmethod
    def forward(ctx, x_ND, ids_N, weight_N, gate_up_EFD, down_EDF, config=None):
        order_N, offsets_E1 = permute(ids_N, gate_up_EFD.shape[0], config)
        act_NF, h_NF2 = _gate_up(x_ND, order_N, offsets_E1, gate_up_EFD, True, config)
        y_ND = _down(act_NF, order_N, offsets_E1, down_EDF.transpose(1, 2), (weight_N, ids_N), config)
        ctx.save_for_backward(x_ND, ids_N, weight_N, gate_up_EFD, down_EDF, order_N, offsets_E1, h_NF2)
        ctx.config = config
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_ND):
        x_ND, ids_N, weight_N, gate_up_EFD, down_EDF, order_N, offsets_E1, h_NF2 = ctx.saved_tensors
        need_x, _, need_weight, need_gate_up, need_down = ctx.needs_input_grad[:5]
        dy_ND = dy_ND.contiguous()
        dx_ND = dweight_N = dgate_up_EFD = ddown_EDF = None
        if need_x or need_weight or need_gate_up:
            dh_NF2, dweight_N = _down_bwd(dy_ND, order_N, offsets_E1, down_EDF, h_NF2, weight_N, ids_N, ctx.config)
            if need_x:
                dx_ND = _down(dh_NF2, order_N, offsets_E1, gate_up_EFD, None, ctx.config)
            if need_gate_up:
                dgate_up_EFD = _wgrad(dh_NF2, x_ND, order_N, offsets_E1, weight_N, ids_N, gate_up_EFD, False,
                                      ctx.config)
        if need_down:
            ddown_EDF = _wgrad(dy_ND, h_NF2, order_N, offsets_E1, weight_N, ids_N, down_EDF, True, ctx.config)
        dweight_N = dweight_N.to(weight_N.dtype) if need_weight else None
        return dx_ND, None, dweight_N, dgate_up_EFD, ddown_EDF, None


def moe_experts(
    x_ND: torch.Tensor, ids_N: torch.Tensor, weight_N: torch.Tensor, gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor, config: dict | None = None,
) -> torch.Tensor:
    """y_ND: each token through its expert's SwiGLU (gate_up [E, 2F, D], down [E, D, F]) times its routing
    weight; ids == E (the skip class) gives 0. `config` overrides the device's launch configurations (tests,
    tuning): one dict merged into every kernel's entry."""
    _check(x_ND, ids_N, weight_N, gate_up_EFD, down_EDF)
    x_ND, gate_up_EFD, down_EDF = x_ND.contiguous(), gate_up_EFD.contiguous(), down_EDF.contiguous()
    ids_N, weight_N = ids_N.contiguous(), weight_N.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, weight_N, gate_up_EFD, down_EDF)):
        return MoEExpertsFunction.apply(x_ND, ids_N, weight_N, gate_up_EFD, down_EDF, config)
    order_N, offsets_E1 = permute(ids_N, gate_up_EFD.shape[0], config)
    act_NF, _ = _gate_up(x_ND, order_N, offsets_E1, gate_up_EFD, False, config)
    return _down(act_NF, order_N, offsets_E1, down_EDF.transpose(1, 2), (weight_N, ids_N), config)
