"""Weighted mixtures of sources (zaya_train/data/weighted.py and data.sources in zaya_train/train/data.py): draw
probabilities by hand, the seeded interleave, and the shares the packed windows deliver against the targets,
within four standard deviations of the sampling noise computed by hand.
Run: pytest tests/data/test_weighted.py"""

import json
import math

import numpy as np
import pytest

from zaya_train.data.packing import PAD_DOCUMENT
from zaya_train.data.sources import SourceConfig
from zaya_train.data.weighted import WeightedSource, draw_probabilities, interleave_records
from zaya_train.train.config import ConfigError, DataConfig, DataSourceConfig
from zaya_train.train.data import build_training_data


def write_jsonl(path, rows, bad_lines=0):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n" * bad_lines)
    return str(path)


def text_source(tmp_path, name, documents, words, bad_lines=0):
    """`documents` rows of exactly `words` known words each (one token per word with the word tokenizer)."""
    rows = [{"text": " ".join(["hello", "world"][(i + j) % 2] for j in range(words))} for i in range(documents)]
    return write_jsonl(tmp_path / f"{name}.jsonl", rows, bad_lines)


def test_draw_probabilities_by_hand():
    # Token shares 0.6 / 0.4 of documents 10 and 40 tokens long: per document 0.06 and 0.01, so 6/7 and 1/7.
    assert draw_probabilities([0.6, 0.4], [10, 40], "tokens") == pytest.approx([6 / 7, 1 / 7])
    assert draw_probabilities([3, 1], [10, 40], "documents") == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="unit"):
        draw_probabilities([1], [1], "bytes")


def test_the_interleave_is_seeded_and_counts_skips_per_source(tmp_path):
    sources = [
        WeightedSource("a", SourceConfig(path=text_source(tmp_path, "a", 30, 3, bad_lines=2)), 1.0),
        WeightedSource("b", SourceConfig(path=text_source(tmp_path, "b", 10, 5)), 1.0),
    ]
    stats = {}
    first = list(interleave_records(sources, [0.5, 0.5], seed=0, stats=stats))
    assert first == list(interleave_records(sources, [0.5, 0.5], seed=0))
    assert first != list(interleave_records(sources, [0.5, 0.5], seed=1))
    assert stats["a"].skipped["bad_json"] >= 2 and not stats["b"].skipped
    # all_exhausted: the pass ends once both have been read through, so each appears at least whole.
    counts = np.bincount([i for _, i in first])
    assert counts[0] >= 30 and counts[1] >= 10


def test_document_shares_hold_within_sampling_error(tmp_path):
    weights = [0.5, 0.3, 0.2]
    sizes = [400, 100, 50]
    sources = [WeightedSource(n, SourceConfig(path=text_source(tmp_path, n, k, 2)), w)
               for n, k, w in zip("abc", sizes, weights, strict=True)]
    drawn = [i for _, i in interleave_records(sources, draw_probabilities(weights, [1] * 3, "documents"), seed=0)]
    n = len(drawn)
    for index, p in enumerate(weights):
        share = drawn.count(index) / n
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (index, share, p, n)


@pytest.fixture
def tokenizer_dir(word_tokenizer, tmp_path):
    word_tokenizer.save_pretrained(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


def test_packed_windows_deliver_the_token_shares(tmp_path, tokenizer_dir):
    # Documents of 4 + 2 and 40 + 2 tokens (BOS, EOS): equal token shares need ~7x more short documents.
    short, long = text_source(tmp_path, "short", 3000, 4), text_source(tmp_path, "long", 400, 40)
    cfg = DataConfig(kind="pretrain", tokenizer=tokenizer_dir, seq_len=64, sources=[
        DataSourceConfig(name="short", path=short, weight=0.5), DataSourceConfig(name="long", path=long, weight=0.5)])
    data = build_training_data(cfg, tmp_path / "run", seed=0, rank=0)
    windows = data.windows
    assert data.source_names == ["short", "long"]
    assert data.stats["data/mix/short/target_share"] == 0.5
    assert data.stats["data/mix/short/probability"] == pytest.approx((0.5 / 6) / (0.5 / 6 + 0.5 / 42))

    # Padding is source -1 exactly where it is document -1, and every document comes from one source.
    assert np.array_equal(windows.source_ids == PAD_DOCUMENT, windows.document_ids == PAD_DOCUMENT)
    tokens = np.zeros(2)
    documents = np.zeros(2, dtype=int)
    for row_sources, row_docs in zip(windows.source_ids, windows.document_ids, strict=True):
        for doc in range(row_docs.max() + 1):
            [source] = set(row_sources[row_docs == doc].tolist())
            tokens[source] += (row_docs == doc).sum()
            documents[source] += 1
    assert [data.stats["data/mix/short/tokens"], data.stats["data/mix/long/tokens"]] == tokens.tolist()

    # The token share of source 0 is a ratio of sums over i.i.d. draws: its variance by the delta method is
    # E[(L (1[draw is 0] - s))^2] / (N E[L]^2), with q the draw probabilities and L the lengths.
    q, lengths = np.array([(0.5 / 6), (0.5 / 42)]), np.array([6.0, 42.0])
    q /= q.sum()
    n = documents.sum()
    mean_length = (q * lengths).sum()
    s = 0.5
    variance = (q[0] * (lengths[0] * (1 - s)) ** 2 + q[1] * (lengths[1] * s) ** 2) / (n * mean_length**2)
    share = tokens[0] / tokens.sum()
    assert abs(share - s) < 4 * math.sqrt(variance), (share, math.sqrt(variance))


def test_sft_sources_tag_their_examples(tmp_path, tokenizer_dir):
    def chat(i, words):
        return {"messages": [{"role": "user", "content": "what is it"},
                             {"role": "assistant", "content": " ".join(["a", "b"][(i + j) % 2] for j in range(words))}]}

    one = write_jsonl(tmp_path / "one.jsonl", [chat(i, 3) for i in range(20)])
    two = write_jsonl(tmp_path / "two.jsonl", [chat(i, 9) for i in range(20)])
    cfg = DataConfig(kind="sft", tokenizer=tokenizer_dir, seq_len=64, sources=[
        DataSourceConfig(name="one", path=one), DataSourceConfig(name="two", path=two)])
    data = build_training_data(cfg, tmp_path / "run", seed=0, rank=0)
    windows = data.windows
    assert np.array_equal(windows.source_ids == PAD_DOCUMENT, windows.document_ids == PAD_DOCUMENT)
    lengths = {0: set(), 1: set()}
    for sources, docs in zip(windows.source_ids, windows.document_ids, strict=True):
        for doc in range(docs.max() + 1):
            [source] = set(sources[docs == doc].tolist())
            lengths[source].add(int((docs == doc).sum()))
    # Each source's chats keep their own length in the windows: two's are six assistant words longer.
    assert len(lengths[0]) == len(lengths[1]) == 1
    assert lengths[1].pop() - lengths[0].pop() == 6


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"path": "x.jsonl"}, "data.sources"),
        ({"sources": [{"name": "a"}, {"name": "a"}]}, "data.sources"),
        ({"sources": [{"name": "???"}]}, "data.sources.name"),
        ({"sources": [{"name": "a", "path": None}]}, "data.sources.a.path"),
        ({"sources": [{"name": "a", "weight": 0}]}, "data.sources.a.weight"),
        ({"sources": [{"name": "a", "path": "/nonexistent/*.jsonl"}]}, "data.sources.a.path"),
        ({"share_unit": "bytes"}, "data.share_unit"),
    ],
)
def test_bad_sources_name_the_key(tmp_path, kwargs, key):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}])
    if "path" in kwargs:
        (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
        kwargs = {**kwargs, "path": str(tmp_path / "x.jsonl")}
    sources = kwargs.pop("sources", [{"name": "a"}])
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": "):
        DataConfig(kind="pretrain", sources=[DataSourceConfig(**{"path": good, **s}) for s in sources], **kwargs)
