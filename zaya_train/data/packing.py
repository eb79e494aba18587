"""Packing tokenized data into fixed windows of `seq_len` tokens for the model's packed mode.

A window is three int64 arrays of length S: `input_ids`, `labels` (-100 = no loss) and `document_ids`. The model
takes `document_ids` [B, S] (attention, convolutions and positions stay inside a document) and shifts `labels`
itself: the logits at position s are scored against `labels[s + 1]`. Hence the label at the first token of a
document is always -100, so no document's last token is trained to predict the next document's first token.
Document ids are numbered 0, 1, ... within each window; trailing padding is document -1, `pad_id` tokens with
label -100 (packed mode takes no attention mask: a negative id fences padding off as its own document and keeps
it out of the expert load counts).
Windows built from a mixture of sources (`zaya_train.data.weighted`) carry a fourth array, `source_ids`: the index
of the source each token came from (-1 on padding), so the trainer can log the share each source actually
delivers.

Pretraining (`pack_pretrain`, streaming, greedy in stream order):
- each document becomes `[BOS] + ids + [EOS]` (each optional, `PretrainPackConfig.add_bos/add_eos`); the
  BOS is never a target (document start), EOS is, so the model learns where documents end;
- documents go into the open window while they fit; one that does not fit starts a new window and the old one
  is padded. A document longer than the window is cut into window-sized pieces (BOS only on the first, EOS only
  on the last); each piece is its own document, full pieces fill a window each and the remainder is placed like
  any other document.

SFT (`tokenize_chat` then `pack_sft`): the chat template is rendered with labels on assistant tokens only;
complete examples are placed by best-fit-decreasing (as in the ZAYA1-8B report, arXiv 2605.05365, §IV-A), never truncated: an example longer than the
window is reported in `SFTPackStats.too_long` and left out.

    windows = list(pack_pretrain(token_docs, PretrainPackConfig(seq_len=4096, bos_id=1, eos_id=2, pad_id=0)))
    examples = [tokenize_chat(messages, tok) for messages in chats]
    windows, stats = pack_sft(examples, seq_len=4096, pad_id=tok.pad_token_id)
    WindowArrays.from_windows(windows).save(out_dir); WindowArrays.load(out_dir)   # random access, memory-mapped
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = -100


PAD_DOCUMENT = -1


@dataclass
class PackedWindow:
    input_ids: np.ndarray
    labels: np.ndarray
    document_ids: np.ndarray
    source_ids: np.ndarray | None = None


class SourcedDocument(NamedTuple):
    """A document's token ids and the index of the source it came from, for `pack_pretrain`."""

    ids: Sequence[int]
    source: int


@dataclass
class _Piece:
    ids: np.ndarray
    labels: np.ndarray
    source: int | None = None


def _finish_window(pieces: list[_Piece], seq_len: int, pad_id: int) -> PackedWindow:
    """Concatenate pieces as consecutive documents, mask each document start and pad to seq_len. `source_ids`
    only when every piece names its source."""
    ids, labels, docs = [], [], []
    for doc, piece in enumerate(pieces):
        piece_labels = piece.labels.copy()
        piece_labels[0] = IGNORE_INDEX
        ids.append(piece.ids)
        labels.append(piece_labels)
        docs.append(np.full(len(piece.ids), doc, dtype=np.int64))
    pad = seq_len - sum(len(p) for p in ids)
    assert pad >= 0
    sources = None
    if pieces and all(piece.source is not None for piece in pieces):
        # int16: a quarter of the host memory of the other arrays, for at most 32,767 sources.
        sources = np.concatenate(
            [np.full(len(piece.ids), piece.source, dtype=np.int16) for piece in pieces]
            + [np.full(pad, PAD_DOCUMENT, dtype=np.int16)]
        )
    if pad:
        ids.append(np.full(pad, pad_id, dtype=np.int64))
        labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
        docs.append(np.full(pad, PAD_DOCUMENT, dtype=np.int64))
    return PackedWindow(np.concatenate(ids), np.concatenate(labels), np.concatenate(docs), sources)


# --------------------------------------------------------------------------------------------------------------
# Pretraining


@dataclass
class PretrainPackConfig:
    seq_len: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"packing.seq_len={self.seq_len} must be at least 2")
        if self.add_bos and self.bos_id is None:
            raise ValueError("packing.add_bos=True needs packing.bos_id")
        if self.add_eos and self.eos_id is None:
            raise ValueError("packing.add_eos=True needs packing.eos_id")


@dataclass
class PackStats:
    documents: int = 0
    empty_documents: int = 0
    split_documents: int = 0
    windows: int = 0
    tokens: int = 0
    pad_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def pack_pretrain(
    documents: Iterable[Sequence[int] | SourcedDocument], config: PretrainPackConfig, stats: PackStats | None = None
) -> Iterator[PackedWindow]:
    """Yield windows from token-id documents (without special tokens) in stream order; `stats` is updated as
    windows are yielded. The last window is padded. `SourcedDocument`s give the windows `source_ids`."""
    stats = stats if stats is not None else PackStats()
    seq_len = config.seq_len
    open_pieces: list[_Piece] = []
    used = 0

    def emit() -> PackedWindow:
        nonlocal open_pieces, used
        window = _finish_window(open_pieces, seq_len, config.pad_id)
        stats.windows += 1
        stats.pad_tokens += seq_len - used
        open_pieces, used = [], 0
        return window

    for doc in documents:
        source = doc.source if isinstance(doc, SourcedDocument) else None
        body = list(doc.ids if isinstance(doc, SourcedDocument) else doc)
        if not body:
            stats.empty_documents += 1
            continue
        full = (
            ([config.bos_id] if config.add_bos else []) + body + ([config.eos_id] if config.add_eos else [])
        )
        ids = np.asarray(full, dtype=np.int64)
        stats.documents += 1
        stats.tokens += len(ids)
        if len(ids) > seq_len:
            stats.split_documents += 1
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if used + len(piece) > seq_len:
                yield emit()
            open_pieces.append(_Piece(piece, piece, source))
            used += len(piece)
            if used == seq_len:
                yield emit()
    if open_pieces:
        yield emit()


# --------------------------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTExample:
    input_ids: np.ndarray
    labels: np.ndarray
    source: int | None = None  # the index of the source it came from, in a mixture of sources

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_chat(messages: list[dict[str, str]], tokenizer) -> SFTExample:
    """Render `messages` with the tokenizer's chat template; labels are the ids on assistant tokens (the
    template's `{% generation %}` parts) and -100 elsewhere."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    if not mask.any():
        raise ValueError(
            "tokenize_chat: no assistant tokens; the conversation needs an assistant turn and the chat template "
            "must wrap assistant content in {% generation %} ... {% endgeneration %}"
        )
    return SFTExample(input_ids=ids, labels=np.where(mask, ids, IGNORE_INDEX))


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> tuple[list[list[int]], list[int]]:
    """Bins of item indices. Items go longest first (ties: lower index first) into the open bin with the least
    room that still fits them (ties: the older bin), else into a new bin; inside a bin they keep placement order.
    Items longer than `capacity` are returned separately, unplaced."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    order = sorted((i for i, n in enumerate(lengths) if n <= capacity), key=lambda i: (-lengths[i], i))
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            bins.append([i])
            room, b = capacity, len(bins) - 1
        else:
            room, b = free.pop(pos)
            bins[b].append(i)
        bisect.insort(free, (room - lengths[i], b))
    return bins, too_long


@dataclass
class SFTPackStats:
    examples: int = 0
    windows: int = 0
    tokens: int = 0
    pad_tokens: int = 0
    too_long: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "examples": self.examples,
            "windows": self.windows,
            "tokens": self.tokens,
            "pad_tokens": self.pad_tokens,
            "too_long": len(self.too_long),
        }


def pack_sft(
    examples: Sequence[SFTExample], seq_len: int, pad_id: int
) -> tuple[list[PackedWindow], SFTPackStats]:
    """Best-fit-decreasing packing of whole examples; `stats.too_long` lists indices of examples left out.
    Packs the whole sequence at once: for a corpus too large for memory, call it on consecutive chunks."""
    if seq_len < 1:
        raise ValueError(f"pack_sft seq_len={seq_len} must be positive")
    bins, too_long = best_fit_decreasing([len(e) for e in examples], seq_len)
    windows = [
        _finish_window([_Piece(examples[i].input_ids, examples[i].labels, examples[i].source) for i in b],
                       seq_len, pad_id)
        for b in bins
    ]
    tokens = sum(len(examples[i]) for b in bins for i in b)
    stats = SFTPackStats(
        examples=len(examples) - len(too_long),
        windows=len(windows),
        tokens=tokens,
        pad_tokens=len(windows) * seq_len - tokens,
        too_long=too_long,
    )
    return windows, stats


# --------------------------------------------------------------------------------------------------------------
# Storage


class WindowArrays(Sequence[PackedWindow]):
    """Windows as three [N, S] int64 arrays (and int16 `source_ids` for a mixture): random access for the loader,
    saved as .npy and memory-mapped back."""

    FIELDS = ("input_ids", "labels", "document_ids")
    OPTIONAL = "source_ids"

    def __init__(
        self, input_ids: np.ndarray, labels: np.ndarray, document_ids: np.ndarray,
        source_ids: np.ndarray | None = None,
    ) -> None:
        shapes = [a.shape for a in (input_ids, labels, document_ids, source_ids) if a is not None]
        if len(set(shapes)) != 1 or input_ids.ndim != 2:
            raise ValueError(f"WindowArrays needs equal [N, S] arrays, got {shapes}")
        self.input_ids, self.labels, self.document_ids = input_ids, labels, document_ids
        self.source_ids = source_ids

    @property
    def _present(self) -> tuple[str, ...]:
        return self.FIELDS + ((self.OPTIONAL,) if self.source_ids is not None else ())

    @classmethod
    def from_windows(cls, windows: Iterable[PackedWindow]) -> WindowArrays:
        windows = list(windows)
        if not windows:
            raise ValueError("WindowArrays.from_windows: no windows")
        arrays = [np.stack([getattr(w, name) for w in windows]) for name in cls.FIELDS]
        sourced = all(w.source_ids is not None for w in windows)
        return cls(*arrays, np.stack([w.source_ids for w in windows]) if sourced else None)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self._present:
            np.save(directory / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> WindowArrays:
        directory = Path(directory)
        missing = [name for name in cls.FIELDS if not (directory / f"{name}.npy").is_file()]
        if missing:
            raise ValueError(f"WindowArrays.load: {str(directory)!r} lacks {missing}")
        mode = "r" if mmap else None
        optional = directory / f"{cls.OPTIONAL}.npy"
        return cls(
            *(np.load(directory / f"{name}.npy", mmap_mode=mode) for name in cls.FIELDS),
            np.load(optional, mmap_mode=mode) if optional.is_file() else None,
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> PackedWindow:  # type: ignore[override]
        return PackedWindow(*(np.asarray(getattr(self, name)[index]) for name in self.FIELDS),
                            None if self.source_ids is None else np.asarray(self.source_ids[index]))
