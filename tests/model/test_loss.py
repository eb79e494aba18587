"""The fused chunked LM head: the cross-entropy equals logits + F.cross_entropy, and the per-token
log-probabilities equal a float64 unfused log_softmax gather, in value, in gradient for any per-token upstream
gradient, in the model's training path, and in peak memory a fraction of the unfused path's."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.model.loss import linear_cross_entropy, token_logprobs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_fused_loss_matches_reference(bias, chunk_size):
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    fused = linear_cross_entropy(hidden, weight, b, labels, chunk_size=chunk_size)
    (2.5 * fused).backward()
    grads = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    ref = F.cross_entropy(F.linear(hidden, weight, b), labels, ignore_index=-100)
    (2.5 * ref).backward()
    torch.testing.assert_close(fused, ref)
    for got, want in zip(grads, [t.grad for t in (hidden, weight, b) if t is not None]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_forward_without_logits_matches_logits_path():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2))
    ids = torch.randint(3, 64, (3, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(ids, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(fused.loss, ref.loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def reference_logprobs(hidden, weight, targets, temperature, bias=None):
    """Unfused log_softmax(h @ W.T / T)[target], 0 where the target is -100, in the inputs' dtype."""
    logits = F.linear(hidden, weight, bias) / temperature
    picked = logits.log_softmax(-1).gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    return picked * (targets != -100)


def float64_leaves(*tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_token_logprobs_match_float64_reference(bias, temperature, chunk_size):
    # 37 tokens: 7 leaves a short last chunk; 64 is a single chunk larger than the input.
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    # Nonzero upstream gradient at ignored tokens too: their log-probability is a constant and must pass none on.
    grad_N = torch.randn(37)
    got = token_logprobs(hidden, weight, targets, temperature, b, chunk_size=chunk_size)
    (got * grad_N).sum().backward()
    hidden64, weight64, b64 = float64_leaves(hidden, weight, b)
    want = reference_logprobs(hidden64, weight64, targets, temperature, b64)
    (want * grad_N.double()).sum().backward()

    assert got.dtype == torch.float32
    assert torch.all(got[targets == -100] == 0)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    for leaf, leaf64 in [(hidden, hidden64), (weight, weight64), (b, b64)]:
        if leaf is not None:
            torch.testing.assert_close(leaf.grad, leaf64.grad.float(), atol=1e-5, rtol=1e-5)


def test_token_logprobs_frozen_weight_gives_only_the_hidden_gradient():
    hidden = torch.randn(20, 8, requires_grad=True)
    weight, b = torch.randn(30, 8), torch.randn(30)
    targets = torch.randint(0, 30, (20,))
    grad_N = torch.randn(20)
    (token_logprobs(hidden, weight, targets, 1.3, b, chunk_size=6) * grad_N).sum().backward()
    (hidden64,) = float64_leaves(hidden)
    (reference_logprobs(hidden64, weight.double(), targets, 1.3, b.double()) * grad_N.double()).sum().backward()
    torch.testing.assert_close(hidden.grad, hidden64.grad.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("replay", [False, True])
def test_model_logprobs_equal_the_logits_path(replay):
    config = preset("nano", num_hidden_layers=2)
    model = ZayaForCausalLM(config)
    ids = torch.randint(3, 64, (3, 20))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 12] = -100
    # A routing the model would not choose itself, replayed by both paths.
    expert_ids = torch.randint(0, config.num_experts + 1, (3, 20, 2)) if replay else None
    temperature = 1.6
    upstream_BS = torch.randn(3, 20)

    out = model(
        ids, labels=labels, expert_ids=expert_ids, return_expert_ids=True, return_logits=False,
        return_logprobs=True, logprob_temperature=temperature,
    )
    assert out.logits is None and out.loss is None
    if replay:
        assert torch.equal(out.expert_ids, expert_ids)
    (out.logprobs * upstream_BS).sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # logprobs[:, t] is logits row t's log_softmax at labels[:, t + 1]; the last position has no next label.
    logits_BSV = model(ids, expert_ids=expert_ids).logits
    picked_BS = (logits_BSV[:, :-1].double() / temperature).log_softmax(-1).gather(2, labels[:, 1:, None].clamp_min(0))
    want_BS = F.pad(picked_BS.squeeze(2) * (labels[:, 1:] != -100), (0, 1))
    (want_BS * upstream_BS.double()).sum().backward()

    assert out.logprobs.shape == (3, 20) and out.logprobs.dtype == torch.float32
    assert torch.all(out.logprobs[:, -1] == 0) and out.logprobs[1, 11] == 0
    torch.testing.assert_close(out.logprobs, want_BS.float())
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_model_logprobs_need_labels_without_logits():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=1))
    ids = torch.randint(3, 64, (1, 8))
    with pytest.raises(ValueError, match="return_logprobs"):
        model(ids, return_logits=False, return_logprobs=True)
    with pytest.raises(ValueError, match="return_logprobs"):
        model(ids, labels=ids, return_logprobs=True)


class PeakLiveBytes(TorchDispatchMode):
    """The peak of the bytes held by storages that ops create inside the mode (each counted until it is freed);
    storages of the given pre-existing tensors are not counted."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._counted = {id(t.untyped_storage()) for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if id(storage) not in self._counted:
                self._counted.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes


def test_token_logprobs_peak_memory_is_a_chunk_not_all_logits():
    vocab, tokens, dim, chunk = 262_272, 64, 8, 16
    hidden = torch.randn(tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    grad_N = torch.randn(tokens)

    def peak(logprobs_fn):
        hidden.grad = weight.grad = None
        with PeakLiveBytes(hidden, weight, targets, grad_N) as mode:
            (logprobs_fn(hidden, weight, targets, 0.7) * grad_N).sum().backward()
        return mode.peak

    fused = peak(lambda *args: token_logprobs(*args, chunk_size=chunk))
    unfused = peak(reference_logprobs)
    # Both hold the fp32 weight gradient; past that the fused path holds about one chunk of logits.
    weight_grad_bytes = vocab * dim * 4
    assert unfused >= tokens * vocab * 4 + weight_grad_bytes
    assert fused <= unfused / 4
    assert fused <= 1.5 * chunk * vocab * 4 + weight_grad_bytes
