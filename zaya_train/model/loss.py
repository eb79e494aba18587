"""The LM head with fused, chunked linear + log-softmax passes: the training loss and per-token log-probabilities.

Materialising logits costs tokens x vocab floats (16K tokens x 262K vocab is 17 GB in fp32) plus a
log-softmax and its backward over all of them. Both functions here instead walk the tokens in chunks
(`_chunked_head`): each chunk's logits are formed in fp32, reduced to the log-probabilities of the targets and,
given d(output)/d(log-probability) per token, turned at once into that chunk's gradients for the hidden states,
the weight and the bias. Peak memory is one chunk of logits.

    loss = linear_cross_entropy(hidden_ND, weight_VD, bias_V, labels_N)         # mean CE, a scalar
    logprobs_N = token_logprobs(hidden_ND, weight_VD, targets_N, temperature=0.7)  # per token, for RL

`linear_cross_entropy` knows its per-token upstream gradient (-1/num_valid) before the walk, so it forms the
gradients in the forward walk and its backward only scales them. `token_logprobs` takes any per-token upstream
gradient (advantages, importance ratios, masks), which is only known in the backward pass, so its backward walks
the chunks again, recomputing each chunk's logits (one GEMM more than the loss, in exchange for never holding them).

Shape suffixes: N tokens, D hidden, V vocab, C chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from zaya_train.kernels.dispatch import use_triton
from zaya_train.kernels.linear import linear, matmul

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256


class _HeadPass(NamedTuple):
    # Zero where the label is IGNORE_INDEX. None on a pass given `lse_N` (it skips the target logits).
    logprobs_N: torch.Tensor | None
    # The log-normaliser of each token's tempered logits (for a later pass).
    lse_N: torch.Tensor
    # Gradients: None unless the pass was given `grad_N` and the input asks for one.
    grad_hidden_ND: torch.Tensor | None
    grad_weight_VD: torch.Tensor | None
    grad_bias_V: torch.Tensor | None


def _chunked_head(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None, labels_N: torch.Tensor,
    temperature: float, chunk_size: int, *, grad_N: torch.Tensor | None = None, lse_N: torch.Tensor | None = None,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> _HeadPass:
    """One walk over the tokens computing log_softmax((hidden @ weight.T + bias) / temperature)[label] per token
    (fp32) and, with `grad_N` (d output / d logprob per token), the gradients of sum(grad_N * logprobs).

    `lse_N` from an earlier pass over the same inputs skips the max and sum passes (the backward's recompute)."""
    num_tokens = hidden_ND.shape[0]
    valid_N = labels_N != IGNORE_INDEX
    targets_N = labels_N.clamp_min(0)
    logprobs_N = coef_N = None
    if lse_N is None:
        logprobs_N = hidden_ND.new_empty(num_tokens, dtype=torch.float32)
        lse_N = torch.empty_like(logprobs_N)
    grad_hidden_ND = grad_weight_VD = grad_bias_V = None
    if grad_N is not None:
        # d(output)/d(raw logits) = grad * (onehot - softmax) / temperature; ignored tokens contribute nothing.
        coef_N = grad_N.float() * valid_N / temperature
        if needs_input_grad[0]:
            grad_hidden_ND = torch.empty_like(hidden_ND)
        if bias_V is not None and needs_input_grad[2]:
            grad_bias_V = torch.zeros_like(bias_V, dtype=torch.float32)
    for start in range(0, num_tokens, chunk_size):
        chunk = slice(start, start + chunk_size)
        h_CD = hidden_ND[chunk]
        grad_CV = _chunk_softmax(
            h_CD, weight_VD, bias_V, targets_N[chunk], temperature, lse_N[chunk],
            logprobs_N[chunk] if logprobs_N is not None else None, coef_N[chunk] if coef_N is not None else None,
        )
        if grad_CV is None:
            continue
        if grad_hidden_ND is not None:
            grad_hidden_ND[chunk] = matmul(grad_CV, weight_VD)
        if needs_input_grad[1]:
            # The first chunk allocates the weight gradient through its matmul (no separate zero fill); later
            # chunks accumulate in place (BLAS addmm: no [V, D] temporary).
            if grad_weight_VD is None:
                grad_weight_VD = matmul(grad_CV.T.float(), h_CD.float())
            else:
                grad_weight_VD.addmm_(grad_CV.T.float(), h_CD.float())
        if grad_bias_V is not None:
            grad_bias_V += grad_CV.float().sum(0)
        # Freed before the next chunk's logits exist, so that one chunk buffer is live at a time.
        del grad_CV
    if logprobs_N is not None:
        logprobs_N.sub_(lse_N).masked_fill_(~valid_N, 0.0)
    return _HeadPass(logprobs_N, lse_N, grad_hidden_ND, grad_weight_VD, grad_bias_V)


def _chunk_softmax(
    h_CD: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None, target_C: torch.Tensor,
    temperature: float, lse_C: torch.Tensor, target_logit_C: torch.Tensor | None, coef_C: torch.Tensor | None,
) -> torch.Tensor | None:
    """One chunk of `_chunked_head`. With `target_logit_C` (an output slice) it fills that and `lse_C`;
    otherwise it reads `lse_C`. Returns coef * (onehot(target) - softmax) in the hidden dtype, or
    None without `coef_C`. The softmax runs in place in the logits buffer (one chunk-sized buffer)."""
    rows_C = torch.arange(h_CD.shape[0], device=h_CD.device)
    logits_CV = linear(h_CD, weight_VD, bias_V).float()
    if temperature != 1.0:
        logits_CV.div_(temperature)
    if target_logit_C is None:
        # A normalised softmax straight away: the walk that computed lse_C already did the max and the sum.
        probs_CV = logits_CV.sub_(lse_C[:, None]).exp_()
        prob_scale_C1 = None
    else:
        target_logit_C.copy_(logits_CV[rows_C, target_C])
        max_C1 = logits_CV.amax(dim=-1, keepdim=True)
        probs_CV = logits_CV.sub_(max_C1).exp_()
        sum_C1 = probs_CV.sum(dim=-1, keepdim=True)
        lse_C.copy_((max_C1 + sum_C1.log()).squeeze(-1))
        prob_scale_C1 = sum_C1.reciprocal()
    if coef_C is None:
        return None
    neg_coef_C1 = -coef_C[:, None]
    grad_CV = probs_CV.mul_(neg_coef_C1 if prob_scale_C1 is None else neg_coef_C1 * prob_scale_C1)
    grad_CV[rows_C, target_C] += coef_C
    return grad_CV.to(h_CD.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, labels_N, chunk_size):
        num_valid = (labels_N != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        # The loss is -sum(logprobs) / num_valid, so its gradient per log-probability is known before the walk.
        grad_N = torch.full_like(labels_N, -1.0, dtype=torch.float32) / num_valid
        head = _chunked_head(
            hidden_ND, weight_VD, bias_V, labels_N, 1.0, chunk_size, grad_N=grad_N,
            needs_input_grad=ctx.needs_input_grad[:3],
        )
        ctx.save_for_backward(head.grad_hidden_ND, head.grad_weight_VD, head.grad_bias_V)
        ctx.weight_dtype = weight_VD.dtype
        return -head.logprobs_N.sum() / num_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_ND, grad_weight_VD, grad_bias_V = ctx.saved_tensors
        return (
            grad_hidden_ND * grad_loss.to(grad_hidden_ND.dtype) if grad_hidden_ND is not None else None,
            (grad_weight_VD * grad_loss).to(ctx.weight_dtype) if grad_weight_VD is not None else None,
            (grad_bias_V * grad_loss).to(grad_bias_V.dtype) if grad_bias_V is not None else None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None, labels_N: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels` (IGNORE_INDEX not counted), without
    materialising the logits. Equals `F.cross_entropy(F.linear(h, w, b).float(), labels, ignore_index=-100)`."""
    return _LinearCrossEntropy.apply(hidden_ND, weight_VD, bias_V, labels_N, chunk_size)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, targets_N, temperature, chunk_size):
        head = _chunked_head(hidden_ND, weight_VD, bias_V, targets_N, temperature, chunk_size)
        ctx.save_for_backward(hidden_ND, weight_VD, bias_V, targets_N, head.lse_N)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return head.logprobs_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs_N):
        hidden_ND, weight_VD, bias_V, targets_N, lse_N = ctx.saved_tensors
        head = _chunked_head(
            hidden_ND, weight_VD, bias_V, targets_N, ctx.temperature, ctx.chunk_size, grad_N=grad_logprobs_N,
            lse_N=lse_N, needs_input_grad=ctx.needs_input_grad[:3],
        )
        return (
            head.grad_hidden_ND,
            head.grad_weight_VD.to(weight_VD.dtype) if head.grad_weight_VD is not None else None,
            head.grad_bias_V.to(bias_V.dtype) if head.grad_bias_V is not None else None,
            None,
            None,
            None,
        )


def token_logprobs(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, temperature: float = 1.0,
    bias_V: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """fp32 log_softmax((hidden @ weight.T + bias) / temperature)[target] per token, without materialising the
    logits; 0 (with no gradient) where the target is IGNORE_INDEX. Differentiable for any upstream gradient per
    token: the backward recomputes the logits chunk by chunk (peak memory one chunk of logits, never N x V)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return _TokenLogprobs.apply(hidden_ND, weight_VD, bias_V, targets_N, float(temperature), chunk_size)


class ZayaLMHead(nn.Linear):
    """`lm_head`: logits, or with `labels` the fused training loss or per-token log-probabilities (through this
    module's forward, so that ZeRO-3 gathers its weight like any module's, for the backward's recompute too).
    `kernels` (set by the model from ZayaConfig.kernels) chooses the Triton versions of the two fused paths
    (zaya_train.kernels.lm_head, chunk size from the device's config) or this file's, their reference."""

    kernels: str = "auto"

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor | None = None, *, return_logprobs: bool = False,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Logits; with `labels` the mean cross-entropy; with `labels` and `return_logprobs` the log-probabilities
        of `labels` under softmax(logits / temperature), shaped like `labels` (see `token_logprobs`)."""
        if labels is None:
            return linear(hidden, self.weight, self.bias)
        hidden_ND, labels_N = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if return_logprobs:
            logprobs_fn = token_logprobs
            if use_triton("token_logprobs", self.kernels, hidden.device):
                from zaya_train.kernels.lm_head import token_logprobs as logprobs_fn
            return logprobs_fn(hidden_ND, self.weight, labels_N, temperature, self.bias).view(labels.shape)
        loss_fn = linear_cross_entropy
        if use_triton("linear_cross_entropy", self.kernels, hidden.device):
            from zaya_train.kernels.lm_head import linear_cross_entropy as loss_fn
        return loss_fn(hidden_ND, self.weight, self.bias, labels_N)
