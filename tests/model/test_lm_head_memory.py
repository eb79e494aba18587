"""Peak memory of the chunked LM-head cross-entropy (`zaya_train.model.loss.linear_cross_entropy`, the
reference of the Triton LM-head kernel and the model's CPU path) against the unfused path (logits, then
F.cross_entropy), at ZAYA1's vocabulary of 262,272, forward and backward.

How it is measured: `tracemalloc` does not see PyTorch's allocator, and `torch.cuda.max_memory_allocated`
needs a GPU, so `LiveTensorBytes` (a TorchDispatchMode) watches every tensor an ATen op returns while the
computation runs: the first time it sees a storage it adds its bytes to a running total, and a finalizer on
that storage subtracts them when PyTorch frees it (storages keep one Python object for their lifetime, so the
finalizer fires at the free, not earlier). The peak of the total is the most memory the computation's own
tensors held at once: inputs and weights made before the mode are not counted, views are not counted twice,
in-place ops add nothing, and the backward is included (autograd runs its ops under the same mode). It misses
only scratch memory that an op allocates and frees inside itself (BLAS packing buffers), which both paths have
alike.
"""

import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from zaya_train.model.loss import linear_cross_entropy

VOCAB = 262_272


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen = {id(t.untyped_storage()) for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(storage := tensor.untyped_storage()) not in self._seen:
                self._seen.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def test_chunked_loss_peak_memory_is_under_a_quarter_of_the_unfused_path():
    tokens, hidden_size, chunk = 256, 8, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (tokens,), generator=g)
    labels[::7] = -100

    def peak_and_grads(loss_fn):
        hidden.grad = weight.grad = None
        with LiveTensorBytes(hidden, weight, labels) as mode:
            loss = loss_fn()
            loss.backward()
        return mode.peak, loss.detach(), hidden.grad, weight.grad

    unfused = peak_and_grads(lambda: F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100))
    chunked = peak_and_grads(lambda: linear_cross_entropy(hidden, weight, None, labels, chunk_size=chunk))
    # Same numbers first: a path that skipped work could look small.
    torch.testing.assert_close(chunked[1], unfused[1])
    torch.testing.assert_close(chunked[2], unfused[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked[3], unfused[3], atol=1e-5, rtol=1e-4)

    logits_bytes = tokens * VOCAB * 4
    weight_grad_bytes = VOCAB * hidden_size * 4
    assert unfused[0] >= 2 * logits_bytes  # logits and their log-softmax (then its gradient) at least
    assert chunked[0] <= unfused[0] / 4
    # What the chunked path holds: about one chunk of fp32 logits and the weight gradient.
    assert chunked[0] <= 1.5 * chunk * VOCAB * 4 + weight_grad_bytes
