"""Dense and grouped (per-expert) linear layers with a oneDNN path for fp32 on AMD CPUs; `F.linear` /
`F.grouped_mm` (the references) everywhere else.

Why: PyTorch's CPU BLAS is Intel MKL, which runs its AVX2 code on AMD CPUs; oneDNN (also inside every PyTorch
CPU build) runs AVX-512 there. On the 2-core AMD EPYC (Zen 4) development machine an fp32 [2048, 128] x
[128, 512] GEMM takes 1.25 ms through `F.linear` and 0.55 ms through oneDNN (the same numbers to the last bit at
that size), and a 2048^3 GEMM runs at ~490 vs ~210 GFLOP/s. On an Intel Xeon with AVX-512, MKL runs its best
code and oneDNN is the slower one (2048^3, 2 threads: 315 vs 334 GFLOP/s). The oneDNN entry point
(`torch.ops.mkldnn._linear_pointwise`) has no autograd, so the backward passes below are written out:
dx = dy @ W and dW = dy^T @ x, through oneDNN (per-expert weight gradients through BLAS, see
`_OneDNNGroupedLinear`).

    from zaya_train.kernels.linear import linear, grouped_linear, matmul
    y = linear(x, weight, bias)                            # == F.linear(x, weight, bias)
    y_NO = grouped_linear(x_NI, w_EOI, counts_E)           # rows sorted by expert; counts_E rows per expert
    c = matmul(a, b)                                       # == a @ b for 2-D a, b

The route (`cpu_gemm_route`) is chosen once per process from the CPU vendor, not by timing both: the gap comes
from MKL's vendor dispatch, so the vendor predicts it, while a timing on a shared or throttled machine could pick
differently from one process (or rank) to the next and change a run's numerics with it. AuthenticAMD takes
oneDNN; GenuineIntel keeps MKL; any other CPU (Arm, Hygon, or none reported) keeps PyTorch's default, since oneDNN
was measured faster only on AMD and costs memory (it reorders operands into its blocked layouts).
`ZAYA_CPU_GEMM=onednn` or `=aten` overrides the choice (aten: every call goes to the reference ops).

A oneDNN call has a fixed cost of about 10 us, so GEMMs under ONEDNN_MIN_MACS multiply-adds (decode-sized
router layers) stay on `F.linear`, which is faster at that size.

Shape suffixes: N rows, I in features, O out features, E experts.
"""

from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn.functional as F

ONEDNN_MIN_MACS = 2**20
ROUTES = ("onednn", "aten")
_VENDORS = ("AuthenticAMD", "GenuineIntel")


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The x86 vendor string ("AuthenticAMD", "GenuineIntel", ...), or None where the CPU reports none (Arm)."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
        return None
    except OSError:
        pass
    # No /proc (Windows, macOS): Windows names the vendor last ("Intel64 Family 6 Model 85 ..., GenuineIntel").
    processor = platform.processor()
    return next((vendor for vendor in _VENDORS if vendor in processor), None)


@functools.cache
def cpu_gemm_route() -> str:
    """Where this process's fp32 CPU GEMMs go: "onednn" or "aten" (PyTorch's own ops). `ZAYA_CPU_GEMM` if set,
    else oneDNN on AMD CPUs only (see the module docstring). Raises ValueError for another value of
    `ZAYA_CPU_GEMM`, or for `onednn` on a PyTorch build without oneDNN's linear."""
    forced = os.environ.get("ZAYA_CPU_GEMM", "").strip().lower() or None
    if forced is not None and forced not in ROUTES:
        raise ValueError(
            f"ZAYA_CPU_GEMM: must be one of {ROUTES} or unset, got {os.environ['ZAYA_CPU_GEMM']!r}"
        )
    if forced == "onednn" and not _onednn_linear_available():
        raise ValueError(
            "ZAYA_CPU_GEMM: onednn was asked for, but this PyTorch build has no oneDNN linear "
            "(torch.ops.mkldnn._linear_pointwise)"
        )
    if forced is not None:
        return forced
    return "onednn" if cpu_vendor() == "AuthenticAMD" and _onednn_linear_available() else "aten"


@functools.cache
def _onednn_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(2, 3)
        return torch.equal(_onednn(x, torch.ones(4, 3), None), F.linear(x, torch.ones(4, 3)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def uses_onednn(x: torch.Tensor, macs: int = ONEDNN_MIN_MACS) -> bool:
    """Whether a GEMM of `macs` multiply-adds on tensors like `x` takes the oneDNN path (fp32, CPU, the route is
    oneDNN, at least ONEDNN_MIN_MACS; never inside torch.compile, whose inductor picks its own GEMMs)."""
    if torch.compiler.is_compiling():
        return False
    return (
        macs > 0 and macs >= ONEDNN_MIN_MACS and x.device.type == "cpu" and x.dtype == torch.float32
        and cpu_gemm_route() == "onednn"
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
    `F.grouped_mm` with no host sync, or, where the device lacks it, one GEMM per expert. Inside torch.compile
    (without autograd): one opaque op, `_grouped_linear_op`."""
    if torch.compiler.is_compiling():
        return _grouped_linear_op(x_NI, w_EOI, counts_E)
    if uses_onednn(x_NI, x_NI.numel() * w_EOI.shape[1]) and w_EOI.dtype == torch.float32:
        counts = counts_E.tolist()
        if torch.is_grad_enabled() and (x_NI.requires_grad or w_EOI.requires_grad):
            return _OneDNNGroupedLinear.apply(x_NI, w_EOI, counts)
        return _per_expert_onednn(x_NI, w_EOI, counts)
    return _grouped_mm_or_loop(x_NI, w_EOI, counts_E)


def _grouped_mm_or_loop(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    if grouped_mm_supported(x_NI.device.type, x_NI.dtype):
        return F.grouped_mm(x_NI, w_EOI.transpose(1, 2), offs=counts_E.cumsum(0).to(torch.int32))
    pieces = torch.split(x_NI, counts_E.tolist())
    return torch.cat([piece @ w_EOI[e].T for e, piece in enumerate(pieces)])


# Opaque to torch.compile, which cannot trace F.grouped_mm everywhere (its meta function takes only bf16 on some
# builds, so fp32 on a CPU does not trace) nor the per-expert loop (data-dependent splits). No autograd: only the
# compiled decode step (zaya_train.model.decode) runs it.
@torch.library.custom_op("zaya_train::grouped_linear", mutates_args=())
def _grouped_linear_op(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_or_loop(x_NI, w_EOI, counts_E)


@_grouped_linear_op.register_fake
def _(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])
