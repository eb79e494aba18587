"""The nano chain-sum task: the exact format of a worked example written by hand, fixed length,
solution-only labels, determinism by (seed, index), held-out exclusion, and the exact-answer checker.
Run: pytest tests/data/test_synthetic.py"""

import pytest

from zaya_train.data.packing import IGNORE_INDEX
from zaya_train.data.synthetic import (
    NANO_CHARS,
    ChainSumConfig,
    ChainSumDataset,
    extract_answer,
    held_out_problems,
    is_correct,
    make_problem,
    validation_problems,
)
from zaya_train.data.tokenizer import char_tokenizer

DOC_PROMPT = "Q37+82+15+64+29+51="
DOC_SOLUTION = "730+28=911,911+51=431,431+46=891,891+92=722,722+15=872,A278"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(NANO_CHARS)


def test_matches_the_worked_example():
    p = make_problem([37, 82, 15, 64, 29, 51], ChainSumConfig())
    assert (p.prompt, p.solution, p.answer) == (DOC_PROMPT, DOC_SOLUTION, "278")


def test_zero_padding_of_small_sums():
    # 10+10=20 -> "020" reversed "020"; 20+13=33 -> "033" reversed "330"; operands reversed: 10 -> "01", 13 -> "31".
    p = make_problem([10, 10, 13], ChainSumConfig(num_terms=3))
    assert p.prompt == "Q10+10+13="
    assert p.solution == "010+01=020,020+31=330,A033"


def test_encoded_window_is_80_tokens_with_solution_labels(tok):
    ds = ChainSumDataset(ChainSumConfig(), tok, size=50, seed=7)
    w = ds[0]
    assert len(w.input_ids) == 80 and all(len(ds[i].input_ids) == 80 for i in range(50))
    ids = w.input_ids.tolist()
    assert ids[0] == 1 and ids[-1] == 2
    text = tok.decode(ids[1:-1])
    prompt_len = 1 + len(DOC_PROMPT)  # BOS + prompt: every prompt has the doc example's length
    assert text[prompt_len - 2] == "="
    assert w.labels[:prompt_len].tolist() == [IGNORE_INDEX] * prompt_len
    assert w.labels[prompt_len:].tolist() == ids[prompt_len:]
    assert w.document_ids.tolist() == [0] * 80
    problem = ds.problem(0)
    assert text == problem.prompt + problem.solution
    assert is_correct(problem, tok.decode(ids[prompt_len:], skip_special_tokens=True))


def test_deterministic_by_seed_and_index(tok):
    a = ChainSumDataset(ChainSumConfig(), tok, size=1000, seed=3)
    b = ChainSumDataset(ChainSumConfig(), tok, size=10, seed=3)
    c = ChainSumDataset(ChainSumConfig(), tok, size=1000, seed=4)
    assert [a.problem(i) for i in range(10)] == [b.problem(i) for i in range(10)]
    assert a.problem(999) == ChainSumDataset(ChainSumConfig(), tok, size=1000, seed=3).problem(999)
    assert [a.problem(i) for i in range(10)] != [c.problem(i) for i in range(10)]
    assert len({a.problem(i).numbers for i in range(1000)}) > 990


def test_held_out_problems_never_train(tok):
    default = ChainSumConfig()
    held = held_out_problems(default)
    assert len(held) == 200 and len({p.numbers for p in held}) == 200 and held == held_out_problems(default)
    # A space of 9 problems with 2 held out and 2 for validation: exclusion must be exact, not just unlikely.
    tiny = ChainSumConfig(num_terms=2, low=10, high=12, test_size=2, test_seed=0)
    held_tiny = {p.numbers for p in held_out_problems(tiny)}
    validation_tiny = {p.numbers for p in validation_problems(tiny)}
    assert len(held_tiny) == len(validation_tiny) == 2 and not held_tiny & validation_tiny
    seen = {ChainSumDataset(tiny, tok, size=300, seed=1).problem(i).numbers for i in range(300)}
    assert seen == {(a, b) for a in (10, 11, 12) for b in (10, 11, 12)} - held_tiny - validation_tiny


def test_checker_is_exact():
    p = make_problem([37, 82, 15, 64, 29, 51], ChainSumConfig())
    assert is_correct(p, DOC_SOLUTION)
    assert is_correct(p, "A278")  # an aggregator may output the answer alone
    assert is_correct(p, "____________A278")
    assert not is_correct(p, DOC_SOLUTION[:-1] + "9")
    assert not is_correct(p, "A0278")
    assert not is_correct(p, "A278,")
    assert not is_correct(p, "730+28=911")
    assert extract_answer("1+2=3,A060") == "060"
    assert extract_answer("no answer") is None
    assert not is_correct(
        make_problem([10, 10, 13, 10, 10, 10], ChainSumConfig()), "A63"
    )  # padding is part of it
