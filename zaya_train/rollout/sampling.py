"""Token sampling for the rollout engine: greedy, temperature, top-k and top-p, driven by per-request uniforms.

Each request owns a `UniformStream` over a `torch.Generator` seeded from (seed, request index); its i-th sampled
token is the inverse CDF of the (filtered) distribution at the stream's i-th uniform. A request's random stream
therefore does not depend on which other requests share its batch, which a batched `torch.multinomial` with one
generator could not give.

    from zaya_train.rollout.sampling import UniformStream, request_generator, draw_uniforms, sample
    streams = [UniformStream(request_generator(seed=0, index=i)) for i in range(batch)]
    tokens_B, logprobs_B = sample(logits_BV, temperature=1.0, top_p=0.9, top_k=0, uniforms_B=draw_uniforms(streams))

Shape suffixes: B rows, V vocab.
"""

from __future__ import annotations

import hashlib

import torch


def request_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for request `index` of a call seeded with `seed`; hashing keeps nearby seeds unrelated."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class UniformStream:
    """A generator's float64 uniforms in [0, 1), in order, fetched `BLOCK` at a time: one `torch.rand` call per
    token and request cost more than the rest of a sampling step. A CPU generator draws a float64 tensor's
    elements one after another, so the stream is the same as one draw per token."""

    BLOCK = 64

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.buffer: list[float] = []
        self.used = 0

    def next(self) -> float:
        if self.used == len(self.buffer):
            self.buffer = torch.rand(self.BLOCK, generator=self.generator, dtype=torch.float64).tolist()
            self.used = 0
        self.used += 1
        return self.buffer[self.used - 1]


def draw_uniforms(streams: list[UniformStream]) -> torch.Tensor:
    """The next uniform of every stream, in order, as a float64 tensor."""
    return torch.tensor([stream.next() for stream in streams], dtype=torch.float64)


def sample(
    logits_BV: torch.Tensor, temperature: float, top_p: float, top_k: int, uniforms_B: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (token [B], its log-probability [B]).

    The log-probability is always taken under log_softmax(logits / temperature) over the whole vocabulary, i.e.
    before top-k/top-p truncation and renormalisation (what an importance ratio against the trainer's policy
    needs); with temperature 0 (greedy: argmax, first index on ties, no uniforms used) it is log_softmax(logits).
    """
    logits_BV = logits_BV.float()
    if temperature == 0:
        tokens_B = logits_BV.argmax(dim=-1)
        logprobs_BV = logits_BV.log_softmax(dim=-1)
        return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
    logprobs_BV = (logits_BV / temperature).log_softmax(dim=-1)
    probs_BV = logprobs_BV.exp()
    order_BV = None
    if top_k > 0 or top_p < 1.0:
        # Stable sort: equal probabilities keep vocabulary order, so the filtered set is deterministic.
        probs_BV, order_BV = probs_BV.sort(dim=-1, descending=True, stable=True)
        keep_BV = torch.ones_like(probs_BV, dtype=torch.bool)
        if top_k > 0:
            keep_BV[:, top_k:] = False
        if top_p < 1.0:
            # Keep a token while the mass strictly before it is below top_p (the most likely token always stays).
            keep_BV &= (probs_BV.cumsum(dim=-1) - probs_BV) < top_p
        probs_BV = probs_BV * keep_BV
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    total_B = cdf_BV[:, -1]
    # u * total can round up to total; the largest double below it still selects a token of non-zero mass.
    below_total_B = torch.nextafter(total_B, torch.zeros_like(total_B))
    target_B = torch.minimum(uniforms_B.to(cdf_BV.device) * total_B, below_total_B)
    idx_B = torch.searchsorted(cdf_BV, target_B[:, None], right=True).squeeze(-1)
    tokens_B = idx_B if order_BV is None else order_BV.gather(-1, idx_B[:, None]).squeeze(-1)
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
