"""A tiny randomized ZAYA1 (nano, fp32) for the rollout tests, and the independent references they check against:
teacher-forced full forwards without a cache."""

import torch

from zaya_train.model import ZayaForCausalLM, preset

# Conv history of 3 columns and a sliding-window layer, so cache merging has to keep both right. No attention
# bias: then a left-padded prompt computes exactly what it computes alone, which continuous batching relies on.
CONFIG = dict(
    num_hidden_layers=3, cca_time0=3, cca_time1=2, layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=5,
)


@torch.no_grad()
def randomized_model(seed: int, std: float = 0.1) -> ZayaForCausalLM:
    """Every parameter and balancing bias random, so attention, routing and the skip class all matter."""
    torch.manual_seed(seed)
    model = ZayaForCausalLM(preset("nano", **CONFIG)).eval()
    for param in model.parameters():
        param.normal_(0.0, std)
    for router in model.routers():
        router.balancing_biases.normal_(0.0, 0.2)
    return model


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def teacher_forced(model: ZayaForCausalLM, prompt: list[int], tokens: list[int]):
    """One unpadded full forward over prompt + tokens: (logits predicting each new token [N, V],
    router ids of every position [P+N, L])."""
    out = model(torch.tensor([prompt + tokens]), return_expert_ids=True)
    return out.logits[0, len(prompt) - 1 : -1], out.expert_ids[0]


@torch.no_grad()
def reference_greedy(model: ZayaForCausalLM, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding by re-running the full forward (no cache) for every token."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]
