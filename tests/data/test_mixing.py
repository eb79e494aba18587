"""Aggregation chats in SFT: the raw-prompt layout RL feeds, and a seeded draw that hits the configured share.
Run: pytest tests/data/test_mixing.py"""

import json

import numpy as np
import pytest

from zaya_train.data import (
    IGNORE_INDEX,
    NANO_CHARS,
    SFTExample,
    SourceStats,
    aggregation_examples,
    char_tokenizer,
    mix_examples,
)


def examples(n, tag):
    return [SFTExample(np.full(3, tag * 100 + i), np.full(3, tag * 100 + i)) for i in range(n)]


def test_raw_prompt_layout_and_eos_only_on_finished_targets(tmp_path):
    tok = char_tokenizer(NANO_CHARS)
    def chat(user, assistant, **extra):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return {"messages": messages, **extra}

    rows = [
        chat("Q1+2=|A3|", "A3", finished=True),
        chat("Q1+2=|A3|", "1+2", finished=False),
        chat("Q1|", "A1"),  # finished unless it says otherwise
        chat("Q1|", "", finished=False),  # nothing to learn
        {"messages": chat("Q1|", "A1")["messages"][::-1]},  # roles the wrong way round
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    stats = SourceStats()
    got = list(aggregation_examples(path, tok, stats))
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompt = [bos, *ids("Q1+2=|A3|")]
    assert got[0].input_ids.tolist() == [*prompt, *ids("A3"), eos]
    assert got[0].labels.tolist() == [IGNORE_INDEX] * len(prompt) + [*ids("A3"), eos]
    assert got[1].input_ids.tolist() == [*prompt, *ids("1+2")], "a cut-off target gets no EOS"
    assert got[2].input_ids.tolist()[-1] == eos
    assert len(got) == 3 and stats.rows_read == 6 and stats.rows_kept == 3
    assert dict(stats.skipped) == {"empty_target": 1, "not_an_aggregation_chat": 1, "bad_json": 1}


@pytest.mark.parametrize(("share", "expected"), [(0.0, 0), (0.25, 10), (0.5, 30), (0.9, 270)])
def test_share_of_the_samples_and_cycling_through_the_rows(share, expected):
    chats, extra = examples(30, 1), examples(8, 2)
    mixed, stats = mix_examples(chats, extra, share, seed=3)
    assert mixed[:30] == chats and len(mixed) == 30 + expected
    assert stats == {"chats": 30, "aggregation": expected, "share": pytest.approx(expected / (30 + expected))}
    assert stats["share"] == pytest.approx(share, abs=1 / (30 + expected))
    drawn = [int(e.input_ids[0]) - 200 for e in mixed[30:]]
    # Whole seeded permutations of the 8 rows, one per pass: every row as often as every other, to within one.
    counts = np.bincount(drawn, minlength=8)
    assert counts.max() - counts.min() <= 1
    again, _ = mix_examples(chats, extra, share, seed=3)
    assert [e.input_ids.tolist() for e in again] == [e.input_ids.tolist() for e in mixed]
    if expected > 8:
        other, _ = mix_examples(chats, extra, share, seed=4)
        assert [e.input_ids.tolist() for e in other] != [e.input_ids.tolist() for e in mixed]


def test_share_one_is_the_aggregation_chats_alone_and_an_empty_pool_is_refused():
    mixed, stats = mix_examples(examples(5, 1), examples(4, 2), 1.0, seed=0)
    assert [int(e.input_ids[0]) for e in mixed] == [200, 201, 202, 203]
    assert stats["share"] == 1.0
    with pytest.raises(ValueError, match="no aggregation example"):
        mix_examples(examples(5, 1), [], 0.5, seed=0)
