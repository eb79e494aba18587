"""The batch loader: contiguous per-rank slices of each global step, seeded shuffling, and exact resumption from
`state_dict()` at the same or a different world size, for random-access and streamed window sources.
Windows here carry their own index in every token, so a batch shows which windows it holds.
Run: pytest tests/data/test_loader.py"""

import numpy as np
import pytest

from zaya_train.data.loader import LoaderConfig, PackedLoader
from zaya_train.data.packing import PackedWindow

N = 10


def window(i):
    ids = np.full(3, i, dtype=np.int64)
    return PackedWindow(ids, ids + 100, np.zeros(3, dtype=np.int64))


WINDOWS = [window(i) for i in range(N)]


def stream():
    return (window(i) for i in range(N))


def index_rows(batch):
    return batch["input_ids"][:, 0].tolist()


def take(loader, k):
    return [index_rows(next(loader)) for _ in range(k)]


def test_batches_and_rank_slices_without_shuffle():
    cfg = LoaderConfig(micro_batch_size=2, shuffle=False, num_epochs=2)
    r0, r1 = PackedLoader(WINDOWS, cfg, 0, 2), PackedLoader(WINDOWS, cfg, 1, 2)
    batch = next(r0)
    assert sorted(batch) == ["document_ids", "input_ids", "labels"]
    assert batch["input_ids"].shape == (2, 3) and batch["labels"][0].tolist() == [100, 100, 100]
    # Global step t holds windows [4t, 4t + 4): rank 0 the first two, rank 1 the next two; epochs run on.
    assert [index_rows(batch)] + take(r0, 4) == [[0, 1], [4, 5], [8, 9], [2, 3], [6, 7]]
    assert take(r1, 5) == [[2, 3], [6, 7], [0, 1], [4, 5], [8, 9]]
    # 20 windows over 2 epochs = 5 global steps of 4; both ranks stop together.
    with pytest.raises(StopIteration):
        next(r0)
    with pytest.raises(StopIteration):
        next(r1)


def test_shuffle_is_a_seeded_permutation_per_epoch():
    def epoch_orders(seed):
        loader = PackedLoader(WINDOWS, LoaderConfig(micro_batch_size=N, seed=seed), 0, 1)
        return take(loader, 2)

    a, b = epoch_orders(0)
    assert sorted(a) == sorted(b) == list(range(N)) and a != b
    assert epoch_orders(0) == [a, b]
    assert epoch_orders(1) != [a, b]


@pytest.mark.parametrize("source", [WINDOWS, stream], ids=["random_access", "stream"])
def test_resume_same_world_size(source):
    cfg = LoaderConfig(micro_batch_size=3, seed=5, shuffle_buffer=4)
    for rank in range(2):
        uninterrupted = PackedLoader(source, cfg, rank, 2)
        first = take(uninterrupted, 4)
        state = uninterrupted.state_dict()
        assert state["windows_consumed"] == 4 * 3 * 2
        rest = take(uninterrupted, 5)
        resumed = PackedLoader(source, cfg, rank, 2)
        resumed.load_state_dict(state)
        assert take(resumed, 5) == rest
        assert take(PackedLoader(source, cfg, rank, 2), 4) == first  # a fresh loader starts over


@pytest.mark.parametrize("source", [WINDOWS, stream], ids=["random_access", "stream"])
def test_resume_two_ranks_on_one(source):
    two = LoaderConfig(micro_batch_size=2, seed=3, shuffle_buffer=4)
    ranks = [PackedLoader(source, two, r, 2) for r in range(2)]
    for loader in ranks:
        take(loader, 3)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()  # the position is global, the same on every rank
    expected = [a + b for a, b in zip(take(ranks[0], 6), take(ranks[1], 6))]

    one = PackedLoader(source, LoaderConfig(micro_batch_size=4, seed=3, shuffle_buffer=4), 0, 1)
    one.load_state_dict(state)
    assert take(one, 6) == expected


def test_stream_shuffle_buffer_is_a_permutation():
    loader = PackedLoader(
        stream, LoaderConfig(micro_batch_size=N, seed=0, shuffle_buffer=4, num_epochs=1), 0, 1
    )
    order = take(loader, 1)[0]
    assert sorted(order) == list(range(N)) and order != list(range(N))
    with pytest.raises(StopIteration):
        next(loader)


def test_mistakes_are_reported():
    with pytest.raises(ValueError, match="loader.micro_batch_size=0"):
        LoaderConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="rank=2"):
        PackedLoader(WINDOWS, LoaderConfig(micro_batch_size=1), 2, 2)
    loader = PackedLoader(WINDOWS, LoaderConfig(micro_batch_size=1, seed=1), 0, 1)
    with pytest.raises(ValueError, match="seed=0"):
        loader.load_state_dict({"windows_consumed": 4, "seed": 0, "shuffle": True})


def test_a_stream_pass_without_windows_is_an_error():
    passes = []

    def empty_stream():
        passes.append(len(passes))
        if len(passes) > 3:
            raise AssertionError("the loader keeps restarting a stream that yields nothing")
        return iter([])

    loader = PackedLoader(empty_stream, LoaderConfig(micro_batch_size=1), 0, 1)
    with pytest.raises(ValueError, match="pass 0 over the window stream yielded no window"):
        next(loader)
    assert passes == [0]
