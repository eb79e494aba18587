"""Dense and grouped (per-expert) linear layers with a oneDNN path for fp32 on CPU; `F.linear` / `F.grouped_mm`
(the references) everywhere else.

Why: PyTorch's CPU BLAS is Intel MKL, which runs its AVX2 code on AMD CPUs; oneDNN (also inside every PyTorch
CPU build) runs AVX-512 there. On the 2-core Zen 5 development machine an fp32 [2048, 128] x [128, 512] GEMM
takes 1.25 ms through `F.linear` and 0.55 ms through oneDNN, the same numbers to the last bit at that size. The
oneDNN entry point (`torch.ops.mkldnn._linear_pointwise`) has no autograd, so the backward passes below are
written out: dx = dy @ W and dW = dy^T @ x, through oneDNN (per-expert weight gradients through BLAS, see
`_OneDNNGroupedLinear`).

    from zaya_train.kernels.linear import linear, grouped_linear, matmul
    y = linear(x, weight, bias)                            # == F.linear(x, weight, bias)
    y_NO = grouped_linear(x_NI, w_EOI, counts_E)           # rows sorted by expert; counts_E rows per expert
    c = matmul(a, b)                                       # == a @ b for 2-D a, b

A oneDNN call has a fixed cost of about 10 us there, so GEMMs under ONEDNN_MIN_MACS multiply-adds (decode-sized
router layers) stay on `F.linear`, which is faster at that size. `ZAYA_CPU_GEMM=aten` turns the oneDNN path off
(every call then goes to the reference ops).

Shape suffixes: N rows, I in features, O out features, E experts.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

ONEDNN_MIN_MACS = 2**20


@functools.cache
def _onednn_linear_available() -> bool:
    if os.environ.get("ZAYA_CPU_GEMM", "onednn") == "aten" or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(2, 3)
        return torch.equal(_onednn(x, torch.ones(4, 3), None), F.linear(x, torch.ones(4, 3)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def uses_onednn(x: torch.Tensor, macs: int = ONEDNN_MIN_MACS) -> bool:
    """Whether a GEMM of `macs` multiply-adds on tensors like `x` takes the oneDNN path (fp32, CPU, oneDNN
    present, at least ONEDNN_MIN_MACS)."""
    return (
        macs > 0 and macs >= ONEDNN_MIN_MACS and x.device.type == "cpu" and x.dtype == torch.float32
        and _onednn_linear_available()
    )


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_NO = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad_NO, weight.t(), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn(grad_NO.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_NO.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias)."""
    if not uses_onednn(x, x.numel() * weight.shape[0]) or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def matmul(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D operands, without autograd (for code that writes its own backward)."""
    if uses_onednn(a_MK, a_MK.numel() * b_KN.shape[1]) and b_KN.dtype == torch.float32:
        return _onednn(a_MK, b_KN.t(), None)
    return a_MK @ b_KN


class _OneDNNGroupedLinear(torch.autograd.Function):
    """Per-expert oneDNN GEMMs. oneDNN builds (JIT-compiles) a kernel for every new row count, and an expert's
    row count changes with the routing at every step, so each expert runs on a window of a bucketed number of
    rows (`bucket_rows`) taken from the sorted rows around its own, and keeps its own rows of the result: the
    kernels for a handful of sizes are built once and reused. The weight gradient, whose row count is the
    reduction dimension and cannot be padded with other experts' rows, uses PyTorch's BLAS."""

    @staticmethod
    def forward(ctx, x_NI, w_EOI, counts):
        ctx.save_for_backward(x_NI, w_EOI)
        ctx.counts = counts
        return _per_expert_onednn(x_NI, w_EOI, counts)

    @staticmethod
    def backward(ctx, grad_NO):
        x_NI, w_EOI = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        rows = list(_expert_rows(ctx.counts))
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.cat([_windowed(grad_NO, start, count, w_EOI[e].t()) for e, start, count in rows])
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_EOI)
            for e, start, count in rows:
                torch.mm(grad_NO[start : start + count].t(), x_NI[start : start + count], out=grad_w[e])
        return grad_x, grad_w, None


def bucket_rows(count: int) -> int:
    """`count` rounded up to one of eight sizes per power of two (at most 12.5% more rows)."""
    step = 1 << max(count.bit_length() - 4, 0)
    return -(-count // step) * step


def _per_expert_onednn(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.cat([_windowed(x_NI, start, count, w_EOI[e]) for e, start, count in _expert_rows(counts)])


def _windowed(rows_NI: torch.Tensor, start: int, count: int, weight_OI: torch.Tensor) -> torch.Tensor:
    """rows[start : start + count] @ weight.T, computed on a window of bucket_rows(count) rows that contains them."""
    size = min(bucket_rows(count), rows_NI.shape[0])
    window_start = min(start, rows_NI.shape[0] - size)
    out_WO = _onednn(rows_NI[window_start : window_start + size], weight_OI, None)
    return out_WO[start - window_start : start - window_start + count]


def _expert_rows(counts: list[int]):
    """(expert, first row, row count) for every expert that received rows."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, count
        start += count


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Probes `F.grouped_mm` once per (device, dtype): its support differs across CPU, CUDA and ROCm builds."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        x = torch.ones(16, 16, device=device_type, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        F.grouped_mm(x, w, offs=torch.tensor([8, 16], device=device_type, dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Row block e of x (the next counts_E[e] rows) times w_EOI[e].T: every expert on its contiguous slice.

    fp32 on CPU: one oneDNN GEMM per expert (reading the counts costs no device sync there). Elsewhere one
    `F.grouped_mm` with no host sync, or, where the device lacks it, one GEMM per expert."""
    if uses_onednn(x_NI, x_NI.numel() * w_EOI.shape[1]) and w_EOI.dtype == torch.float32:
        counts = counts_E.tolist()
        if torch.is_grad_enabled() and (x_NI.requires_grad or w_EOI.requires_grad):
            return _OneDNNGroupedLinear.apply(x_NI, w_EOI, counts)
        return _per_expert_onednn(x_NI, w_EOI, counts)
    if grouped_mm_supported(x_NI.device.type, x_NI.dtype):
        return F.grouped_mm(x_NI, w_EOI.transpose(1, 2), offs=counts_E.cumsum(0).to(torch.int32))
    pieces = torch.split(x_NI, counts_E.tolist())
    return torch.cat([piece @ w_EOI[e].T for e, piece in enumerate(pieces)])
