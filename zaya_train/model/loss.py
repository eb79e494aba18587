"""The LM head with a fused, chunked linear + cross-entropy for training.

Materialising logits costs tokens x vocab floats (16K tokens x 262K vocab is 17 GB in fp32) plus a
log-softmax and its backward over all of them. `linear_cross_entropy` instead walks the tokens in chunks: each
chunk's logits are formed in fp32, reduced to the loss, and turned at once into that chunk's gradients for the
hidden states and the weight, which the backward pass then only scales. Peak memory is one chunk of logits.

Shape suffixes: N tokens, D hidden, V vocab, C chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from zaya_train.kernels.linear import linear, matmul

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, labels_N, chunk_size):
        valid_N = labels_N != IGNORE_INDEX
        num_valid = valid_N.sum().clamp_min(1).to(torch.float32)
        targets_N = labels_N.clamp_min(0)
        grad_hidden_ND = torch.empty_like(hidden_ND)
        grad_weight_VD = None
        grad_bias_V = torch.zeros_like(bias_V, dtype=torch.float32) if bias_V is not None else None
        loss = hidden_ND.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden_ND.shape[0], chunk_size):
            h_CD = hidden_ND[start : start + chunk_size]
            rows = torch.arange(h_CD.shape[0], device=h_CD.device)
            target_C = targets_N[start : start + chunk_size]
            scale_C = valid_N[start : start + chunk_size].float() / num_valid
            logits_CV = linear(h_CD, weight_VD, bias_V).float()
            target_logit_C = logits_CV[rows, target_C]
            # Softmax in place (one chunk-sized buffer, five passes); it becomes d(mean loss)/d(logits):
            # (softmax - onehot(target)) / num_valid on counted tokens.
            max_C1 = logits_CV.amax(dim=-1, keepdim=True)
            probs_CV = logits_CV.sub_(max_C1).exp_()
            sum_C1 = probs_CV.sum(dim=-1, keepdim=True)
            lse_C = (max_C1 + sum_C1.log()).squeeze(-1)
            loss += ((lse_C - target_logit_C) * scale_C).sum()
            grad_CV = probs_CV.mul_(scale_C[:, None] / sum_C1)
            grad_CV[rows, target_C] -= scale_C
            grad_CV = grad_CV.to(h_CD.dtype)
            grad_hidden_ND[start : start + chunk_size] = matmul(grad_CV, weight_VD)
            # The first chunk allocates the weight gradient through its matmul (no separate zero fill); later
            # chunks accumulate in place (BLAS addmm: no [V, D] temporary).
            if grad_weight_VD is None:
                grad_weight_VD = matmul(grad_CV.T.float(), h_CD.float())
            else:
                grad_weight_VD.addmm_(grad_CV.T.float(), h_CD.float())
            if grad_bias_V is not None:
                grad_bias_V += grad_CV.float().sum(0)
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD, grad_bias_V)
        ctx.has_bias = bias_V is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_ND, grad_weight_VD, grad_bias_V = ctx.saved_tensors
        grad_bias = (grad_bias_V * grad_loss).to(grad_bias_V.dtype) if ctx.has_bias else None
        return (
            grad_hidden_ND * grad_loss.to(grad_hidden_ND.dtype),
            (grad_weight_VD * grad_loss).to(grad_hidden_ND.dtype),
            grad_bias,
            None,
            None,
        )


def linear_cross_entropy(
    hidden_ND: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None, labels_N: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels` (IGNORE_INDEX not counted), without
    materialising the logits. Equals `F.cross_entropy(F.linear(h, w, b).float(), labels, ignore_index=-100)`."""
    return _LinearCrossEntropy.apply(hidden_ND, weight_VD, bias_V, labels_N, chunk_size)


class ZayaLMHead(nn.Linear):
    """`lm_head`: logits, or with `labels` the fused training loss (through this module's forward, so that
    ZeRO-3 gathers its weight like any module's)."""

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return linear(hidden, self.weight, self.bias)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, self.bias, labels.reshape(-1))
