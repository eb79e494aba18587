"""The Triton fused LM head (chunked GEMMs around `_softmax_ce_kernel`), run by the Triton interpreter on the
CPU, equals its PyTorch reference, the model's chunked head (`zaya_train.model.loss`), and through it the
unfused logits + log-softmax: the mean cross-entropy and the per-token log-probabilities at a temperature, in
value and in the gradients for the hidden states, the weight and the bias; with ignored labels (-100, a whole
chunk of them included), a vocabulary that is not a multiple of the kernel's block (131 in blocks of 32) and a
token count that is not a multiple of the chunk (37 in chunks of 8)."""

import pytest
import torch
import torch.nn.functional as F

from zaya_train.model import loss as reference

TOKENS, HIDDEN, VOCAB, CHUNK = 37, 16, 131, 8
BLOCKS = {"BLOCK_V": 32}


def inputs(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).to(dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=g).to(dtype)
    b = torch.randn(VOCAB, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[::5] = -100
    labels[8:16] = -100  # the second chunk has no token to learn from
    return hidden, weight, b, labels


def grads_of(fn, tensors, scale):
    """fn(*leaves) and the gradients of sum(output * scale) for every tensor that is not None."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    (out * scale).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves if leaf is not None]


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_linear_cross_entropy_matches_reference(interpret, bias):
    hidden, weight, b, labels = inputs(bias=bias)

    def kernel(h, w, b):
        return interpret.lm_head.linear_cross_entropy(h, w, b, labels, chunk_size=CHUNK, config=BLOCKS)

    got, got_grads = grads_of(kernel, (hidden, weight, b), 2.5)
    want, want_grads = grads_of(lambda h, w, b: reference.linear_cross_entropy(h, w, b, labels, CHUNK),
                                (hidden, weight, b), 2.5)
    exact, exact_grads = grads_of(
        lambda h, w, b: F.cross_entropy(F.linear(h, w, b), labels, ignore_index=-100),
        [t.double() if t is not None else None for t in (hidden, weight, b)], 2.5,
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # evaluation: no gradient pass at all
        evaluated = interpret.lm_head.linear_cross_entropy(hidden, weight, b, labels, CHUNK, BLOCKS)
    torch.testing.assert_close(evaluated, want, atol=1e-6, rtol=1e-6)
    for name, grad, ref, ref64 in zip(("hidden", "weight", "bias"), got_grads, want_grads, exact_grads):
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(grad.double(), ref64, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_reference(interpret, temperature):
    hidden, weight, b, labels = inputs(seed=1)
    # A nonzero upstream gradient at ignored tokens too: their log-probability is a constant 0 and passes none
    # on.
    upstream_N = torch.randn(TOKENS, generator=torch.Generator().manual_seed(2))

    def kernel(h, w, b):
        return interpret.lm_head.token_logprobs(h, w, labels, temperature, b, chunk_size=CHUNK, config=BLOCKS)

    got, got_grads = grads_of(kernel, (hidden, weight, b), upstream_N)
    want, want_grads = grads_of(lambda h, w, b: reference.token_logprobs(h, w, labels, temperature, b, CHUNK),
                                (hidden, weight, b), upstream_N)
    assert got.dtype == torch.float32 and torch.all(got[labels == -100] == 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad, ref in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_matches_the_bf16_reference(interpret):
    """In bf16 both paths run the GEMMs in bf16 and the softmax in fp32; they differ by bf16 roundings."""
    hidden, weight, b, labels = inputs(dtype=torch.bfloat16, seed=3)
    upstream_N = torch.randn(TOKENS, generator=torch.Generator().manual_seed(4))
    for fn, ref_fn, scale in [
        (lambda h, w, b: interpret.lm_head.linear_cross_entropy(h, w, b, labels, CHUNK, BLOCKS),
         lambda h, w, b: reference.linear_cross_entropy(h, w, b, labels, CHUNK), 1.0),
        (lambda h, w, b: interpret.lm_head.token_logprobs(h, w, labels, 0.7, b, CHUNK, BLOCKS),
         lambda h, w, b: reference.token_logprobs(h, w, labels, 0.7, b, CHUNK), upstream_N),
    ]:
        got, got_grads = grads_of(fn, (hidden, weight, b), scale)
        want, want_grads = grads_of(ref_fn, (hidden, weight, b), scale)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        for name, grad, ref in zip(("hidden", "weight", "bias"), got_grads, want_grads):
            assert grad.dtype == torch.bfloat16, name
            torch.testing.assert_close(grad.float(), ref.float(), atol=2e-2 * ref.float().abs().max().item(),
                                       rtol=1.6e-2, msg=name)


def test_frozen_weight_and_all_ignored_labels(interpret):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g)  # frozen: only the hidden states get a gradient
    labels = torch.full((6,), -100)
    loss = interpret.lm_head.linear_cross_entropy(hidden, weight, None, labels, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)
    hidden.grad = None
    targets = torch.randint(0, 20, (6,), generator=g)
    got = interpret.lm_head.token_logprobs(hidden, weight, targets, 1.3, chunk_size=4)
    got.sum().backward()
    hidden64 = hidden.detach().double().requires_grad_(True)
    want = (F.linear(hidden64, weight.double()) / 1.3).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    want.sum().backward()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, atol=1e-5, rtol=1e-5)
