"""Token sampling for the rollout engine: greedy, temperature, top-k and top-p, driven by per-request uniforms.

Each request owns a `torch.Generator` seeded from (seed, request index) and draws exactly one uniform per sampled
token; the token is the inverse CDF of the (filtered) distribution at that uniform. A request's random stream
therefore does not depend on which other requests share its batch, which a batched `torch.multinomial` with one
generator could not give.

    from zaya_train.rollout.sampling import request_generator, draw_uniforms, sample
    gens = [request_generator(seed=0, index=i) for i in range(batch)]
    tokens_B, logprobs_B = sample(logits_BV, temperature=1.0, top_p=0.9, top_k=0, uniforms_B=draw_uniforms(gens))

Shape suffixes: B rows, V vocab.
"""

from __future__ import annotations

import hashlib

import torch


def request_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for request `index` of a call seeded with `seed`; hashing keeps nearby seeds unrelated."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def draw_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """One float64 uniform in [0, 1) per generator, in order."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


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
