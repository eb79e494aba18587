"""Batches of packed windows for data-parallel training, with a checkpointable position.

The global stream is the sequence of windows over epochs (epoch e shuffled with seed (seed, e)). Global step t
covers the next `micro_batch_size * world_size` windows of it, and rank r takes the contiguous slice
[r * B, (r + 1) * B) of those. The position saved by `state_dict()` is the number of windows of the global stream
consumed so far, the same on every rank, so a run may resume at another world size: 2 ranks x B=2 that stopped
after k steps continue on 1 rank x B=4 with exactly the rows the two ranks would have read next.

Two kinds of window sources:
- a random-access `Sequence[PackedWindow]` (`WindowArrays`, `ChainSumDataset`, a list): each epoch is a
  seeded permutation; resuming jumps straight to the position;
- a callable returning a fresh iterable of windows (`lambda: pack_pretrain(...)`), for streams too large to
  materialise: shuffled through a seeded buffer of `shuffle_buffer` windows; every rank reads the whole stream
  and keeps its slice, and resuming replays the stream up to the position (reading and packing, no model work).
  Each pass calls it again; a pass that yields no window raises ValueError.

With `num_epochs` set the loader stops before the first global step that would run past the data, on all ranks
at once (so no rank waits on a collective the others never reach).

    loader = PackedLoader(windows, LoaderConfig(micro_batch_size=8, seed=0), rank=rank, world_size=world)
    for batch in loader:   # {"input_ids", "labels", "document_ids"(, "source_ids")}: LongTensor [B, S]
        out = model(batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"])
    ckpt["data"] = loader.state_dict();  ...;  loader.load_state_dict(ckpt["data"])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zaya_train.data.packing import PackedWindow

WindowSource = Sequence[PackedWindow] | Callable[[], Iterable[PackedWindow]]


@dataclass
class LoaderConfig:
    micro_batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 10_000  # streams only
    num_epochs: int | None = None  # None: repeat forever

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"loader.micro_batch_size={self.micro_batch_size} must be positive")
        if self.shuffle_buffer < 1:
            raise ValueError(f"loader.shuffle_buffer={self.shuffle_buffer} must be positive")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"loader.num_epochs={self.num_epochs} must be positive or None")


def buffer_shuffle(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Seeded shuffle of a stream through a buffer: fill it, then emit a random slot and refill that slot."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(rng.integers(buffer_size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


class PackedLoader:
    def __init__(
        self, windows: WindowSource, config: LoaderConfig, rank: int = 0, world_size: int = 1
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"loader: rank={rank} must lie in [0, world_size={world_size})")
        self.windows, self.config, self.rank, self.world_size = windows, config, rank, world_size
        self.random_access = isinstance(windows, Sequence)
        if not self.random_access and not callable(windows):
            raise ValueError(
                f"loader windows must be a Sequence of windows or a callable returning an iterable, got {type(windows)}"
            )
        if self.random_access and len(windows) == 0:
            raise ValueError("loader: the window sequence is empty")
        self.position = 0
        self._stream: Iterator[PackedWindow] | None = None
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch_size(self) -> int:
        return self.config.micro_batch_size * self.world_size

    def state_dict(self) -> dict:
        return {"windows_consumed": self.position, "seed": self.config.seed, "shuffle": self.config.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle"):
            if state[key] != getattr(self.config, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but loader.{key}={getattr(self.config, key)!r}; "
                    "the resumed stream would differ"
                )
        self.position = int(state["windows_consumed"])
        self._stream = None

    # ----------------------------------------------------------------------------------------------------------

    def _window_at(self, index: int) -> PackedWindow:
        epoch, offset = divmod(index, len(self.windows))
        if not self.config.shuffle:
            return self.windows[offset]
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.windows))
        return self.windows[int(self._perm[offset])]

    def _global_stream(self) -> Iterator[PackedWindow]:
        epochs = range(self.config.num_epochs) if self.config.num_epochs is not None else itertools.count()
        for epoch in epochs:
            windows = self.windows()
            if self.config.shuffle:
                windows = buffer_shuffle(
                    windows, self.config.shuffle_buffer, np.random.default_rng([self.config.seed, epoch])
                )
            empty = True
            for window in windows:
                empty = False
                yield window
            if empty:
                # Without this an endless loader would start pass after empty pass and never return.
                raise ValueError(f"loader: pass {epoch} over the window stream yielded no window")

    def _next_global_rows(self) -> list[PackedWindow] | None:
        """This rank's rows of the next global step, or None when the data cannot fill a whole global step."""
        start, size, B = self.position, self.global_batch_size, self.config.micro_batch_size
        if self.random_access:
            if self.config.num_epochs is not None and start + size > self.config.num_epochs * len(
                self.windows
            ):
                return None
            return [self._window_at(start + self.rank * B + i) for i in range(B)]
        if self._stream is None:
            self._stream = itertools.islice(self._global_stream(), start, None)
        step = list(itertools.islice(self._stream, size))
        if len(step) < size:
            return None
        return step[self.rank * B : (self.rank + 1) * B]

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self._next_global_rows()
        if rows is None:
            raise StopIteration
        self.position += self.global_batch_size
        names = ["input_ids", "labels", "document_ids"]
        if all(row.source_ids is not None for row in rows):
            names.append("source_ids")
        return {
            name: torch.from_numpy(np.stack([np.asarray(getattr(row, name), dtype=np.int64) for row in rows]))
            for name in names
        }
