"""Packing: pretraining windows (document ids, splitting, label masking at boundaries) against hand-built
arrays, a packed row's loss equal to its documents' losses computed alone, the SFT loss mask on hand-made chats,
best-fit-decreasing against a hand-computed assignment, and window storage. Run: pytest tests/data/test_packing.py"""

import numpy as np
import pytest
import torch

from zaya_train.data.packing import (
    IGNORE_INDEX,
    PackStats,
    PretrainPackConfig,
    SFTExample,
    WindowArrays,
    best_fit_decreasing,
    pack_pretrain,
    pack_sft,
    tokenize_chat,
)

X = IGNORE_INDEX
CFG = PretrainPackConfig(seq_len=8, bos_id=1, eos_id=2, pad_id=0)
DOCS = [[10, 11, 12], [], [20, 21], list(range(30, 41)), [50]]


def rows(windows):
    return [(w.input_ids.tolist(), w.labels.tolist(), w.document_ids.tolist()) for w in windows]


def test_pretrain_windows_by_hand():
    stats = PackStats()
    windows = list(pack_pretrain(DOCS, CFG, stats))
    assert rows(windows) == [
        # [BOS 10 11 12 EOS] then [BOS 20 21 EOS] does not fit: pad, padding is document 1.
        ([1, 10, 11, 12, 2, 0, 0, 0], [X, 10, 11, 12, 2, X, X, X], [0, 0, 0, 0, 0, -1, -1, -1]),
        ([1, 20, 21, 2, 0, 0, 0, 0], [X, 20, 21, 2, X, X, X, X], [0, 0, 0, 0, -1, -1, -1, -1]),
        # The 13-token document: one full window-sized piece ...
        ([1, 30, 31, 32, 33, 34, 35, 36], [X, 30, 31, 32, 33, 34, 35, 36], [0] * 8),
        # ... and its 5-token remainder, its own document, followed by [BOS 50 EOS]. The label at each document's
        # first token is -100, so EOS (position 4) is never trained to predict the next document's BOS.
        ([37, 38, 39, 40, 2, 1, 50, 2], [X, 38, 39, 40, 2, X, 50, 2], [0, 0, 0, 0, 0, 1, 1, 1]),
    ]
    assert stats == PackStats(
        documents=4, empty_documents=1, split_documents=1, windows=4, tokens=25, pad_tokens=7
    )


def test_pretrain_without_bos_eos():
    cfg = PretrainPackConfig(seq_len=4, bos_id=None, eos_id=None, pad_id=0, add_bos=False, add_eos=False)
    assert rows(pack_pretrain([[5, 6], [7], [8, 9, 10]], cfg)) == [
        ([5, 6, 7, 0], [X, 6, X, X], [0, 0, 1, -1]),
        ([8, 9, 10, 0], [X, 9, 10, X], [0, 0, 0, -1]),
    ]
    with pytest.raises(ValueError, match="packing.bos_id"):
        PretrainPackConfig(seq_len=4, bos_id=None, eos_id=2, pad_id=0)


def test_packed_loss_equals_documents_alone():
    from zaya_train.model import ZayaForCausalLM, preset

    model = ZayaForCausalLM(preset("nano", vocab_size=64)).eval()
    window = list(pack_pretrain(DOCS, CFG))[3]
    batch = {k: torch.from_numpy(getattr(window, k))[None] for k in ("input_ids", "labels", "document_ids")}
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"]).loss
        alone = [
            model(torch.tensor([d]), labels=torch.tensor([d])).loss for d in ([37, 38, 39, 40, 2], [1, 50, 2])
        ]
    # 6 targets in the packed row: 4 from the first document, 2 from the second.
    torch.testing.assert_close(packed * 6, alone[0] * 4 + alone[1] * 2, rtol=1e-5, atol=1e-5)


def test_sft_loss_mask_on_assistant_tokens_only(word_tokenizer):
    messages = [
        {"role": "system", "content": "hello"},
        {"role": "user", "content": "what is two"},
        {"role": "assistant", "content": "<think>add one</think>it is two"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y z"},
    ]
    ex = tokenize_chat(messages, word_tokenizer)
    tokens = word_tokenizer.convert_ids_to_tokens(ex.input_ids.tolist())
    trained = [t if label != X else None for t, label in zip(tokens, ex.labels.tolist())]
    assert tokens == [
        "<|bos|>", "<|system|>", "hello", "<|eos|>", "<|user|>", "what", "is", "two", "<|eos|>",
        "<|assistant|>", "<think>", "add", "one", "</think>", "it", "is", "two", "<|eos|>",
        "<|user|>", "x", "<|eos|>", "<|assistant|>", "y", "z", "<|eos|>",
    ]  # fmt: skip
    assert trained == [None] * 10 + ["<think>", "add", "one", "</think>", "it", "is", "two", "<|eos|>"] + [
        None] * 4 + ["y", "z", "<|eos|>"]  # fmt: skip
    assert (ex.labels[ex.labels != X] == ex.input_ids[ex.labels != X]).all()
    with pytest.raises(ValueError, match="no assistant tokens"):
        tokenize_chat(messages[:2], word_tokenizer)


def test_best_fit_decreasing_by_hand():
    # Capacity 10. Longest first: 7 opens bin 0 (room 3); 4 (item 0) opens bin 1 (room 6); 4 (item 4) joins bin 1
    # (room 2); 1 goes to the tightest bin that fits, bin 1 (room 2), not bin 0 (room 3) as first-fit would.
    bins, too_long = best_fit_decreasing([4, 1, 7, 11, 4], 10)
    assert bins == [[2], [0, 4, 1]]
    assert too_long == [3]
    # Equal rooms: the older bin wins; equal lengths: the lower index goes first.
    assert best_fit_decreasing([3, 3, 3, 3], 5) == ([[0], [1], [2], [3]], [])
    assert best_fit_decreasing([2, 3, 3, 2], 5) == ([[1, 0], [2, 3]], [])


def test_pack_sft_windows_and_too_long_report():
    def ex(n, first):
        ids = np.arange(first, first + n)
        return SFTExample(ids, np.where(ids % 2 == 0, ids, X))  # arbitrary hand mask: even ids trained

    examples = [ex(4, 10), ex(1, 20), ex(7, 30), ex(11, 40), ex(4, 60)]
    windows, stats = pack_sft(examples, seq_len=10, pad_id=0)
    assert rows(windows) == [
        (list(range(30, 37)) + [0, 0, 0], [X, X, 32, X, 34, X, 36, X, X, X], [0] * 7 + [-1] * 3),
        # Each example's first label is masked, whatever its own mask says (a document start predicts nothing).
        (
            [10, 11, 12, 13, 60, 61, 62, 63, 20, 0],
            [X, X, 12, X, X, X, 62, X, X, X],
            [0] * 4 + [1] * 4 + [2, -1],
        ),
    ]
    assert stats.too_long == [3]
    assert stats.as_dict() == {"examples": 4, "windows": 2, "tokens": 16, "pad_tokens": 4, "too_long": 1}


def test_window_arrays_save_and_memory_map(tmp_path):
    windows = list(pack_pretrain(DOCS, CFG))
    WindowArrays.from_windows(windows).save(tmp_path / "w")
    loaded = WindowArrays.load(tmp_path / "w")
    assert isinstance(loaded.input_ids, np.memmap) and len(loaded) == 4
    assert rows(loaded) == rows(windows)
    with pytest.raises(ValueError, match="lacks"):
        WindowArrays.load(tmp_path / "missing")
