"""The fused LM head + cross-entropy on the Triton path: the training loss and per-token log-probabilities
(RL), walking the tokens in chunks so that the full [tokens, vocab] logits never exist.

    loss = linear_cross_entropy(hidden_ND, weight_VD, bias_V, labels_N)              # mean CE, a scalar
    logprobs_N = token_logprobs(hidden_ND, weight_VD, targets_N, temperature=0.7)     # per token, fp32

The PyTorch reference these must equal is the model's chunked head, `zaya_train.model.loss` (the same two
functions, same arguments; it stays the model's `torch` path). The walk is the same; what changes is the work
between the GEMMs. Per chunk of C tokens:

1. logits_CV = hidden_CD @ weight_VD.T (+ bias): the vendor GEMM (hipBLASLt / cuBLAS), in the compute dtype;
2. `_softmax_ce_kernel`, one program per token: one read of its logits row for the online max and sum-exp (the
   log-normaliser lse and the target's log-probability), a second read to write the gradient
   coef * (onehot(target) - softmax) over the logits, in place, in the compute dtype;
3. grad_hidden_CD = grad_CV @ weight_VD and grad_weight_VD += grad_CV.T @ hidden_CD: GEMMs again.

The reference spends 8-10 elementwise passes over an fp32 copy of the chunk's logits in step 2 (cast,
temperature, max, subtract, exp, sum, scale, scatter, cast back); the kernel reads the compute-dtype logits
twice and writes them once, and holds one [C, V] buffer (in bf16 2 bytes per logit against the reference's 6
at its peak: bf16 logits, their fp32 copy, the bf16 gradient), so larger chunks fit (`chunk_tokens` in the
device's config file). The GEMMs stay with the vendor library, which is where the FLOPs are and where MI300X's
hipBLASLt is tuned; fusing them into the kernel as well (a Triton GEMM with the online softmax in its
epilogue) is left for later.

The loss's gradient per log-probability is known before the walk (-1 / valid tokens), so its forward also
forms the gradients and the backward only scales them; `token_logprobs` takes any per-token upstream gradient
(advantages, ratios) known only in the backward, which walks the chunks again with the saved lse, recomputing
the logits (the kernel then skips its first read). As in the reference, the weight gradient sums over chunks
in fp32: each chunk's GEMM runs in the compute dtype (tensor cores) and is added into the fp32 sum.

Layers: `_softmax_ce_kernel` (Triton), `_chunk_softmax` (launcher), `_walk` (the chunked GEMMs around it),
`LinearCrossEntropyFunction` / `TokenLogprobsFunction` (autograd), `linear_cross_entropy` / `token_logprobs`.

Shape suffixes: N tokens, D hidden, V vocab, C chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from zaya_train.kernels.configs import launch_config
from zaya_train.kernels.linear import linear, matmul

IGNORE_INDEX = -100


@triton.jit
def _softmax_ce_kernel(
    # logits [C, V] of this chunk in the GEMM's dtype; with HAS_GRAD overwritten by the gradient of the output
    # w.r.t. them (same dtype).
    logits_ptr, stride_logits,
    # targets [C] int64 (IGNORE_INDEX: log-probability 0 and no gradient).
    target_ptr,
    # lse [C] fp32: log-normaliser of the tempered logits, written here (HAS_LSE=False) or read
    # (HAS_LSE=True).
    lse_ptr,
    # logprob [C] fp32: the target's tempered log-probability (HAS_LSE=False only).
    logprob_ptr,
    # coef [C] fp32 (HAS_GRAD): d output / d logprob per token, times valid / temperature.
    coef_ptr,
    V, temperature, ignore_index,
    HAS_LSE: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    target = tl.where(valid, target, 0)
    if HAS_LSE:
        lse = tl.load(lse_ptr + row)
    else:
        # Online log-sum-exp over the vocabulary in one read: the running max m rescales the running sum s.
        # The first block has at least one real column, so m is finite from then on and exp(m - m_new) never
        # sees inf - inf.
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target_logit = tl.load(row_ptr + target).to(tl.float32) / temperature
        tl.store(lse_ptr + row, lse)
        tl.store(logprob_ptr + row, tl.where(valid, target_logit - lse, 0.0))
    if HAS_GRAD:
        # coef is 0 on ignored rows, which then write zeros: the GEMMs after this read every row.
        coef = tl.load(coef_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) / temperature
            grad = -coef * tl.exp(x - lse)
            grad = tl.where(cols == target, grad + coef, grad)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_softmax(
    logits_CV: torch.Tensor, targets_C: torch.Tensor, temperature: float, lse_C: torch.Tensor,
    logprobs_C: torch.Tensor | None, coef_C: torch.Tensor | None, config: dict | None,
) -> None:
    """Launches `_softmax_ce_kernel` on one chunk. With `logprobs_C` (an output slice) fills it and `lse_C`;
    without, reads `lse_C`. With `coef_C`, leaves the gradient in `logits_CV`."""
    num_rows, vocab = logits_CV.shape
    if num_rows == 0:
        return
    assert logits_CV.stride(1) == 1
    cfg = launch_config("softmax_ce", vocab, logits_CV.device, config)
    block_v = min(cfg.meta["BLOCK_V"], triton.next_power_of_2(vocab))
    _softmax_ce_kernel[(num_rows,)](
        logits_CV, logits_CV.stride(0), targets_C, lse_C,
        logprobs_C if logprobs_C is not None else lse_C,
        coef_C if coef_C is not None else lse_C,
        vocab, temperature, IGNORE_INDEX,
        HAS_LSE=logprobs_C is None, HAS_GRAD=coef_C is not None, BLOCK_V=block_v, **cfg.options,
    )


class _HeadPass(NamedTuple):
    logprobs_N: torch.Tensor | None  # None on a pass given lse_N
    lse_N: torch.Tensor
    grad_hidden_ND: torch.Tensor | None
    grad_weight_VD: torch.Tensor | None  # fp32
    grad_bias_V: torch.Tensor | None  # fp32


def chunk_tokens(
    num_tokens: int, vocab: int, device: torch.device, chunk_size: int | None, config: dict | None
) -> int:
    """Tokens per chunk: `chunk_size` if given, else the device config's `chunk_tokens` at this vocab."""
    size = chunk_size
    if size is None:
        size = launch_config("lm_head", vocab, device, config).host["chunk_tokens"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {size!r}")
    return min(size, max(num_tokens, 1))


def _walk(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None, labels_N: torch.Tensor,
    temperature: float, chunk_size: int, config: dict | None, *, grad_N: torch.Tensor | None = None,
    lse_N: torch.Tensor | None = None, needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> _HeadPass:
    """One walk over the tokens: log_softmax((hidden @ weight.T + bias) / temperature)[label] per token (fp32)
    and, given `grad_N` (d output / d logprob per token), the gradients of sum(grad_N * logprobs). `lse_N`
    from an earlier pass skips the kernel's first read (the backward's recompute)."""
    num_tokens = hidden_ND.shape[0]
    labels_N = labels_N.contiguous()
    logprobs_N = coef_N = None
    if lse_N is None:
        logprobs_N = hidden_ND.new_empty(num_tokens, dtype=torch.float32)
        lse_N = torch.empty_like(logprobs_N)
    grad_hidden_ND = grad_weight_VD = grad_bias_V = None
    if grad_N is not None:
        # d(output)/d(raw logit) = grad * (onehot - softmax) / temperature; ignored tokens contribute nothing.
        coef_N = (grad_N.float() * (labels_N != IGNORE_INDEX) / temperature).contiguous()
        if needs_input_grad[0]:
            grad_hidden_ND = torch.empty_like(hidden_ND)
        if bias_V is not None and needs_input_grad[2]:
            grad_bias_V = torch.zeros_like(bias_V, dtype=torch.float32)
    for start in range(0, num_tokens, chunk_size):
        chunk = slice(start, start + chunk_size)
        h_CD = hidden_ND[chunk]
        logits_CV = linear(h_CD, weight_VD, bias_V).contiguous()
        _chunk_softmax(
            logits_CV, labels_N[chunk], temperature, lse_N[chunk],
            logprobs_N[chunk] if logprobs_N is not None else None,
            coef_N[chunk] if coef_N is not None else None, config,
        )
        if coef_N is None:
            continue
        grad_CV = logits_CV  # the kernel wrote the gradient over the logits
        if grad_hidden_ND is not None:
            grad_hidden_ND[chunk] = matmul(grad_CV, weight_VD)
        if needs_input_grad[1]:
            if grad_weight_VD is None:
                grad_weight_VD = matmul(grad_CV.T, h_CD).float()
            elif grad_weight_VD.dtype == grad_CV.dtype:
                grad_weight_VD.addmm_(grad_CV.T, h_CD)  # fp32: accumulate in place, no [V, D] temporary
            else:
                # Compute-dtype GEMM (tensor cores), summed over chunks in fp32 so rounding does not compound.
                grad_weight_VD += matmul(grad_CV.T, h_CD)
        if grad_bias_V is not None:
            grad_bias_V += grad_CV.float().sum(0)
        del logits_CV, grad_CV  # one chunk buffer live at a time
    return _HeadPass(logprobs_N, lse_N, grad_hidden_ND, grad_weight_VD, grad_bias_V)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, labels_N, chunk_size, config):
        num_valid = (labels_N != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        # The loss is -sum(logprobs) / num_valid: its gradient per log-probability is known before the walk.
        # Without any input needing a gradient (evaluation), the kernel skips its gradient pass.
        grad_N = None
        if any(ctx.needs_input_grad[:3]):
            grad_N = torch.full_like(labels_N, -1.0, dtype=torch.float32) / num_valid
        head = _walk(
            hidden_ND, weight_VD, bias_V, labels_N, 1.0, chunk_size, config, grad_N=grad_N,
            needs_input_grad=ctx.needs_input_grad[:3],
        )
        ctx.save_for_backward(head.grad_hidden_ND, head.grad_weight_VD, head.grad_bias_V)
        ctx.weight_dtype = weight_VD.dtype
        return -head.logprobs_N.sum() / num_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden_ND, grad_weight_VD, grad_bias_V = ctx.saved_tensors
        return (
            grad_hidden_ND * grad_loss.to(grad_hidden_ND.dtype) if grad_hidden_ND is not None else None,
            (grad_weight_VD * grad_loss).to(ctx.weight_dtype) if grad_weight_VD is not None else None,
            (grad_bias_V * grad_loss).to(grad_bias_V.dtype) if grad_bias_V is not None else None,
            None, None, None,
        )


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, targets_N, temperature, chunk_size, config):
        head = _walk(hidden_ND, weight_VD, bias_V, targets_N, temperature, chunk_size, config)
        ctx.save_for_backward(hidden_ND, weight_VD, bias_V, targets_N, head.lse_N)
        ctx.temperature, ctx.chunk_size, ctx.config = temperature, chunk_size, config
        return head.logprobs_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs_N):
        hidden_ND, weight_VD, bias_V, targets_N, lse_N = ctx.saved_tensors
        head = _walk(
            hidden_ND, weight_VD, bias_V, targets_N, ctx.temperature, ctx.chunk_size, ctx.config,
            grad_N=grad_logprobs_N, lse_N=lse_N, needs_input_grad=ctx.needs_input_grad[:3],
        )
        return (
            head.grad_hidden_ND,
            head.grad_weight_VD.to(weight_VD.dtype) if head.grad_weight_VD is not None else None,
            head.grad_bias_V.to(bias_V.dtype) if head.grad_bias_V is not None else None,
            None, None, None, None,
        )


def _check(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor) -> None:
    if hidden_ND.ndim != 2 or weight_VD.ndim != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden_ND.shape)} and weight {tuple(weight_VD.shape)} must be [N, D] and [V, D]"
        )
    if labels_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"labels {tuple(labels_N.shape)} must be [N] for hidden {tuple(hidden_ND.shape)}")


def linear_cross_entropy(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None, labels_N: torch.Tensor,
    chunk_size: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels` (IGNORE_INDEX not counted), without
    materialising the logits. `chunk_size` None: the device config's `chunk_tokens`."""
    _check(hidden_ND, weight_VD, labels_N)
    size = chunk_tokens(hidden_ND.shape[0], weight_VD.shape[0], hidden_ND.device, chunk_size, config)
    return LinearCrossEntropyFunction.apply(hidden_ND, weight_VD, bias_V, labels_N, size, config)


def token_logprobs(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, temperature: float = 1.0,
    bias_V: torch.Tensor | None = None, chunk_size: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """fp32 log_softmax((hidden @ weight.T + bias) / temperature)[target] per token, without materialising the
    logits; 0 (with no gradient) where the target is IGNORE_INDEX; differentiable for any upstream gradient
    per token."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check(hidden_ND, weight_VD, targets_N)
    size = chunk_tokens(hidden_ND.shape[0], weight_VD.shape[0], hidden_ND.device, chunk_size, config)
    return TokenLogprobsFunction.apply(
        hidden_ND, weight_VD, bias_V, targets_N, float(temperature), size, config
    )
