"""ZayaCache.extend: appending a freshly prefilled cache to one that has been decoding (different lengths, left
padding in both) and decoding on equals each row's own unpadded full forward.

    pytest tests/rollout/test_cache_extend.py -q
"""

import torch

from tests.rollout.reference import prompts, randomized_model
from zaya_train.model import ZayaCache


def prefill(model, batch: list[list[int]]) -> tuple[ZayaCache, torch.Tensor]:
    width = max(map(len, batch))
    ids_BS = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask_BS = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    cache = ZayaCache(model.config, initial_capacity=width)
    model(ids_BS, attention_mask=mask_BS, position_ids=(mask_BS.cumsum(-1) - 1).clamp_min(0), cache=cache)
    return cache, torch.tensor([len(p) for p in batch])


@torch.no_grad()
def test_extend_then_decode_equals_full_forward():
    model = randomized_model(0)
    running = prompts([3, 9], seed=8)
    cache, positions_B = prefill(model, running)
    # Decode 4 tokens on the running rows, then drop the long one, so the cache starts with all-padding columns.
    for _ in range(4):
        step = [[int(t)] for t in torch.randint(3, 64, (len(running),))]
        model(torch.tensor(step), position_ids=positions_B[:, None], cache=cache)
        running = [p + s for p, s in zip(running, step)]
        positions_B = positions_B + 1
    cache.select(torch.tensor([0]))
    running, positions_B = running[:1], positions_B[:1]

    joining = prompts([6, 14], seed=9)
    new_cache, new_positions_B = prefill(model, joining)
    cache.extend(new_cache, capacity=64)
    rows = running + joining
    positions_B = torch.cat([positions_B, new_positions_B])
    assert cache.batch_size == 3 and cache.seq_len == 14  # the dropped row's leading columns are gone

    for _ in range(3):
        step = [[int(t)] for t in torch.randint(3, 64, (len(rows),))]
        got_BV = model(torch.tensor(step), position_ids=positions_B[:, None], cache=cache).logits[:, -1]
        rows = [p + s for p, s in zip(rows, step)]
        positions_B = positions_B + 1
        for row, ids in enumerate(rows):
            want_V = model(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(got_BV[row], want_V, atol=1e-4, rtol=0)
