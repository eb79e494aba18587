"""Answer-preserving trimming (ZAYA1-8B report, arXiv 2605.05365, §III-A) on hand-made conversations, with the word-level tokenizer of conftest:
every word, special token, `<think>` and `</think>` is one token, so a conversation's length is
1 (BOS) + per message (1 role token + content tokens + 1 EOS). Run: pytest tests/data/test_trimming.py"""

import pytest

from zaya_train.data.trimming import TrimStats, ap_trim, count_tokens, trim_conversations


def chat(*turns):
    return [{"role": role, "content": content} for role, content in turns]


SINGLE = chat(("user", "what is two"), ("assistant", "<think>a b c d e f</think>it is two"))
# 1 + (1+3+1) + (1 + 1+6+1 + 3 + 1) = 19
MULTI = chat(
    ("user", "x"),
    ("assistant", "<think>a b c</think>\none"),
    ("user", "y"),
    ("assistant", "<think>d e f</think>two"),
)
# 1 + 3 + (1 + 5 + 1 + 1) + 3 + (1 + 5 + 1 + 1) = 23


def test_lengths_are_as_hand_counted(word_tokenizer):
    assert count_tokens(SINGLE, word_tokenizer) == 19
    assert count_tokens(MULTI, word_tokenizer) == 23


def test_fitting_conversation_is_unchanged(word_tokenizer):
    assert ap_trim(SINGLE, word_tokenizer, 19) == (SINGLE, "unchanged")


def test_cuts_the_tail_of_the_last_reasoning(word_tokenizer):
    # 3 tokens over: keep the first 3 of 6 reasoning tokens, the closing tag and the whole answer.
    out, outcome = ap_trim(SINGLE, word_tokenizer, 16)
    assert outcome == "trimmed"
    assert out == chat(("user", "what is two"), ("assistant", "<think>a b c</think>it is two"))
    assert count_tokens(out, word_tokenizer) == 16
    # Down to an empty reasoning block (budget 13 = 19 - 6).
    out, _ = ap_trim(SINGLE, word_tokenizer, 13)
    assert out[1]["content"] == "<think></think>it is two"


def test_multi_turn_drops_earlier_thinking_then_cuts_again(word_tokenizer):
    # Budget 18: an empty last reasoning still gives 20 tokens; removing turn 1's <think> block (5 tokens) gives
    # 18 with the last reasoning intact.
    out, outcome = ap_trim(MULTI, word_tokenizer, 18)
    assert outcome == "earlier_thinking_removed"
    assert [m["content"] for m in out] == ["x", "one", "y", "<think>d e f</think>two"]
    # Budget 16: the redone cut keeps one reasoning token of the last turn.
    out, outcome = ap_trim(MULTI, word_tokenizer, 16)
    assert outcome == "earlier_thinking_removed"
    assert [m["content"] for m in out] == ["x", "one", "y", "<think>d</think>two"]
    # Budget 20: the last turn's cut alone suffices, earlier thinking is kept.
    out, outcome = ap_trim(MULTI, word_tokenizer, 20)
    assert outcome == "trimmed"
    assert [m["content"] for m in out] == ["x", "<think>a b c</think>\none", "y", "<think></think>two"]


def test_answers_alone_too_long_is_dropped(word_tokenizer):
    # Answers with both reasoning blocks gone/empty: 1 + 3 + 3 + 3 + 5 = 15 tokens.
    assert ap_trim(MULTI, word_tokenizer, 15)[1] == "earlier_thinking_removed"
    assert ap_trim(MULTI, word_tokenizer, 14) == (None, "dropped")
    no_think = chat(("user", "hello"), ("assistant", "hello world"))  # 1 + 3 + 4 = 8
    assert ap_trim(no_think, word_tokenizer, 7) == (None, "dropped")


def test_counts_over_a_dataset(word_tokenizer):
    kept, stats = trim_conversations([SINGLE, MULTI, MULTI[:2]], word_tokenizer, 14)
    # SINGLE 19 -> 14 keeps 1 of 6 reasoning tokens; MULTI -> dropped; MULTI[:2] = 1 + 3 + 8 = 12 -> unchanged.
    assert stats == TrimStats(samples=3, unchanged=1, trimmed=1, earlier_thinking_removed=0, dropped=1,
                              dropped_indices=[1])
    assert [c[-1]["content"] for c in kept] == ["<think>a</think>it is two", "<think>a b c</think>\none"]
    _, stats = trim_conversations([MULTI], word_tokenizer, 16)
    assert stats.as_dict() == {
        "samples": 1,
        "unchanged": 0,
        "trimmed": 1,
        "earlier_thinking_removed": 1,
        "dropped": 0,
    }


def test_bad_budget(word_tokenizer):
    with pytest.raises(ValueError, match="max_tokens=0"):
        ap_trim(SINGLE, word_tokenizer, 0)
