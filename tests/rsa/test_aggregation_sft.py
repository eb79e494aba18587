"""recipe=build_aggregation_sft on a tiny random teacher: one chat per (problem, sample), each user message
the aggregation prompt over rsa.c tau-tails (checked by hand on character tokens), each target the teacher's
own continuation of that prompt, kept whether or not it is correct, the same rows for the same seed.
Run: pytest tests/rsa/test_aggregation_sft.py"""

import json
import os
import subprocess
import sys

import pytest
import torch

from zaya_train.cli import _register_schema, check_config, compose_run_config
from zaya_train.data import NANO_CHARS, char_tokenizer
from zaya_train.hf import save_pretrained
from zaya_train.loading import load_model
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rewards import ExactMatchVerifier
from zaya_train.rollout import RolloutEngine
from zaya_train.rsa.aggregation_sft import (
    CHATS_FILE,
    SUMMARY_FILE,
    ProblemsFileError,
    build_aggregation_sft,
    chunk_seed,
)
from zaya_train.train.config import ConfigError

TAU, MAX_NEW, SAMPLES = 4, 12, 2
ROWS = [
    {"question": "Q12+34=", "rollouts": ["12+34=46,A46", "1+2=3,A3", "99,A1", "12345678"]},
    {"question": "Q1+1=", "rollouts": ["A2"]},  # fewer than rsa.c = 2 rollouts: skipped, counted
    {"question": "Q5+5=", "rollouts": ["5+5=10,A10", "A11", "000000A10"]},
    {"question": "Q7+8=", "answer": "15", "rollouts": ["7+8=15,A15", "7+8=16,A16"]},
]
# The tau = 4 token tails of those rollouts, by hand: one token per character, "_" in front of a cut tail.
TAILS = {
    1: ["_,A46", "_3,A3", "_9,A1", "_5678"],
    3: ["_,A10", "A11", "_0A10"],
    4: ["_,A15", "_,A16"],
}
SETTINGS = ["rsa.c=2", f"rsa.tau={TAU}", "rsa.beta=16", "rsa.template=compact",
            f"aggregation_sft.max_new_tokens={MAX_NEW}", f"aggregation_sft.samples_per_problem={SAMPLES}",
            "aggregation_sft.verifier=exact", "aggregation_sft.answer_marker=A",
            "aggregation_sft.progress_bar=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("aggregation_sft")
    tokenizer = char_tokenizer(NANO_CHARS)
    teacher = root / "teacher"
    # The model's vocabulary is the tokenizer's, so every sampled id decodes to a character and back.
    torch.manual_seed(0)  # the same teacher every session (module fixtures run before the per-test seeding)
    save_pretrained(ZayaForCausalLM(preset("nano", vocab_size=len(tokenizer))), teacher)
    tokenizer.save_pretrained(teacher)
    marker = tokenizer("_", add_special_tokens=False)["input_ids"]
    settings = [*SETTINGS, f"rsa.truncation_marker_ids={marker}", f"aggregation_sft.teacher={teacher}"]
    return root, teacher, tokenizer, settings


def write_problems(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return path


def build(root, settings, problems, name, seed=0):
    overrides = [*settings, f"aggregation_sft.problems={problems}", f"seed={seed}", f"run_dir={root / name}"]
    cfg = compose_run_config("build_aggregation_sft", overrides)
    summary = build_aggregation_sft(cfg, root / name)
    return [json.loads(line) for line in (root / name / CHATS_FILE).read_text().splitlines()], summary


def test_cli_writes_teacher_continuations_of_the_rsa_prompts(setup):
    root, teacher, tokenizer, settings = setup
    problems = write_problems(root / "problems.jsonl", ROWS)
    proc = subprocess.run([sys.executable, "-m", "zaya_train", "recipe=build_aggregation_sft", *settings,
                           f"aggregation_sft.problems={problems}", f"run_dir={root / 'cli'}"],
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=root, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 6 aggregation chats from 3 problems (2 rows skipped" in proc.stdout
    rows = [json.loads(line) for line in (root / "cli" / CHATS_FILE).read_text().splitlines()]
    summary = json.loads((root / "cli" / SUMMARY_FILE).read_text())
    assert summary["skipped"] == {"bad_json": 1, "too_few_rollouts": 1}
    assert summary["skipped_examples"] == ["line 2: too_few_rollouts", "line 5: bad_json"]
    assert (summary["problems"], summary["chats"], summary["reencoded_differently"]) == (3, 6, 0)

    # SAMPLES chats per usable problem (lines 1, 3, 4), in file order; each prompt is the question and the
    # tails of its parents, in the compact template: question|tail|tail|.
    assert [r["problem"] for r in rows] == [1, 1, 3, 3, 4, 4]
    for row in rows:
        question = ROWS[row["problem"] - 1]["question"]
        assert len(row["parents"]) == 2 and len(set(row["parents"])) == 2
        expected = question + "".join("|" + TAILS[row["problem"]][i] for i in row["parents"]) + "|"
        assert row["messages"][0] == {"role": "user", "content": expected}
        assert row["messages"][1]["role"] == "assistant"
    assert rows[0]["parents"] != rows[1]["parents"] or rows[2]["parents"] != rows[3]["parents"]

    # The targets are the teacher's continuations: the rollout engine on [BOS] + prompt, the chunk's seed.
    engine = RolloutEngine(load_model(teacher).eval())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = [[bos, *encode(r["messages"][0]["content"])] for r in rows]
    results = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0,
                              seed=chunk_seed(0, 0), eos_token_id=eos, max_batch_size=64)
    for row, result in zip(rows, results):
        finished = result.finish_reason == "eos"
        ids = result.token_ids[:-1] if finished else result.token_ids
        assert row["messages"][1]["content"] == tokenizer.decode(ids)
        assert row["finished"] == finished
    # Correctness is recorded only where the problem has an answer.
    assert [r["correct"] is None for r in rows] == [True] * 4 + [False] * 2


def test_targets_are_kept_right_or_wrong_and_depend_only_on_the_seed(setup):
    root, _, _, settings = setup
    first, _ = build(root, settings, write_problems(root / "p0.jsonl", ROWS), "seed0")
    # Give each problem an answer: what one of its targets answers where one does (that chat is then right),
    # one no target says elsewhere.
    verifier = ExactMatchVerifier(answer_marker="A")
    answered = [{**r, "answer": "99999999"} for r in ROWS]
    for row in first:
        said = verifier.extract_answer(row["messages"][1]["content"])
        if said is not None:
            answered[row["problem"] - 1]["answer"] = said
    again, summary = build(root, settings, write_problems(root / "p1.jsonl", answered), "answered")
    assert [r["messages"] for r in again] == [r["messages"] for r in first], "answers change only `correct`"
    assert [r["parents"] for r in again] == [r["parents"] for r in first]
    correct = [r["correct"] for r in again]
    assert all(c in (True, False) for c in correct) and True in correct and False in correct, correct
    assert summary["scored"] == 6 and summary["correct"] == correct.count(True)
    assert summary["share_correct"] == pytest.approx(correct.count(True) / 6)

    other, _ = build(root, settings, write_problems(root / "p2.jsonl", ROWS), "seed1", seed=1)
    assert [(r["parents"], r["messages"]) for r in other] != [(r["parents"], r["messages"]) for r in again]


def test_problems_without_usable_rows_fail_naming_the_key(setup, tmp_path):
    root, _, _, settings = setup
    problems = tmp_path / "short.jsonl"
    problems.write_text(json.dumps(ROWS[1]) + "\n")
    message = r"^aggregation_sft\.problems: no usable problem .*too_few_rollouts 1"
    with pytest.raises(ProblemsFileError, match=message):
        build(root, settings, problems, "short")
    assert not (root / "short" / CHATS_FILE).exists()
    _register_schema()
    with pytest.raises(ConfigError, match=r"^aggregation_sft\.problems: "):
        check_config("build_aggregation_sft", [*settings, f"aggregation_sft.problems={tmp_path / 'x.jsonl'}"])
    with pytest.raises(ConfigError, match=r"^aggregation_sft\.teacher: "):
        check_config("build_aggregation_sft",
                     [f"aggregation_sft.problems={problems}", f"aggregation_sft.teacher={tmp_path}"])
