"""The toy data of `recipe=nano_cascade`, written into run_dir/data once: every stage's prompts, a pretraining corpus
made of them, and a randomly initialised reward model.

    write_toy_data(run_dir / "data", seed=0)   # corpus.jsonl math.jsonl enigmata.jsonl code.jsonl codeio.jsonl
                                               # behaviour.jsonl reward_model/
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TOY_FILES = ("corpus.jsonl", "math.jsonl", "enigmata.jsonl", "code.jsonl", "codeio.jsonl", "behaviour.jsonl")
REWARD_MODEL_DIR = "reward_model"

# (statement, reference program, [(stdin, stdout), ...]): stdin -> stdout problems for the code environments.
CODE_PROBLEMS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Read two integers on one line and print their sum.",
     "a, b = map(int, input().split())\nprint(a + b)", [("1 2", "3"), ("10 5", "15"), ("-3 4", "1")]),
    ("Read an integer n and print 2 * n.", "print(2 * int(input()))", [("4", "8"), ("0", "0"), ("-6", "-12")]),
    ("Read a line of text and print it reversed.", "print(input()[::-1])", [("abc", "cba"), ("level", "level")]),
    ("Read an integer n and print 1 + 2 + ... + n.", "n = int(input())\nprint(n * (n + 1) // 2)",
     [("3", "6"), ("10", "55"), ("1", "1")]),
    ("Read integers on one line and print the largest.", "print(max(map(int, input().split())))",
     [("3 9 2", "9"), ("-1 -5", "-1")]),
    ("Read a word and print it in upper case.", "print(input().upper())", [("cat", "CAT"), ("Zaya", "ZAYA")]),
    ("Read an integer n and print its last digit.", "print(abs(int(input())) % 10)", [("123", "3"), ("-47", "7")]),
    ("Read a line and print how many vowels it has.", "print(sum(c in 'aeiou' for c in input().lower()))",
     [("banana", "3"), ("sky", "0")]),
]

BEHAVIOUR_PROMPTS: list[dict[str, Any]] = [
    {"prompt": "Describe the sea.", "constraints": [{"type": "max_words", "value": 12}]},
    {"prompt": "Name a fruit you like.", "constraints": [{"type": "keywords", "value": ["fruit"]}]},
    {"prompt": "Say hello to a friend.", "constraints": [{"type": "no_commas"}]},
    {"prompt": "Give a colour as JSON with a key named colour.", "constraints": [{"type": "json"}]},
    {"prompt": "Explain what a cat is.", "constraints": [{"type": "min_words", "value": 3}, {"type": "no_commas"}]},
    {"prompt": "Tell me about the moon.", "constraints": []},
    {"prompt": "Write one sentence about rain.", "constraints": [{"type": "max_words", "value": 8},
                                                                 {"type": "keywords", "value": ["rain"]}]},
    {"prompt": "What is two plus two?", "constraints": []},
]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _reasoning_gym_rows(task: str, size: int, seed: int) -> list[dict[str, str]]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed)
    return [{"question": entry["question"], "answer": str(entry["answer"])} for entry in dataset]


def _corpus(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """Text the toy model is pretrained on: every stage's questions with their answers, programs or requests."""
    texts = [f"{r['question']}\n\\boxed{{{r['answer']}}}" for key in ("math", "enigmata") for r in rows[key]]
    texts += [f"{statement}\n```python\n{program}\n```" for statement, program, _ in CODE_PROBLEMS]
    texts += [f"{b['prompt']}\n{b['prompt']}" for b in BEHAVIOUR_PROMPTS]
    from zaya_train.rl.curriculum import RLVE_DEFAULT_ENVIRONMENTS, create_level_dataset

    for task in RLVE_DEFAULT_ENVIRONMENTS:  # stage 2's curriculum at its easiest level
        level = create_level_dataset(task, 0, 0)
        texts += [f"{level[i]['question']}\n\\boxed{{{level[i]['answer']}}}" for i in range(8)]
    for task in ("knights_knaves", "zebra_puzzles", "sudoku", "arc_1d"):  # stage 1's puzzles
        texts += [f"{r['question']}\n\\boxed{{{r['answer']}}}" for r in _reasoning_gym_rows(task, 4, 0)]
    return [{"text": t} for t in texts]


def write_toy_data(data_dir: Path, seed: int) -> Path:
    """Writes the toy files (skipped when a previous run wrote them all) and returns `data_dir`."""
    if all((data_dir / name).is_file() for name in TOY_FILES) and (data_dir / REWARD_MODEL_DIR / "config.json").is_file():
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = {"math": _reasoning_gym_rows("basic_arithmetic", 64, seed),
            "enigmata": _reasoning_gym_rows("letter_counting", 32, seed)}
    _write_jsonl(data_dir / "math.jsonl", rows["math"])
    _write_jsonl(data_dir / "enigmata.jsonl", rows["enigmata"])
    _write_jsonl(data_dir / "code.jsonl", [
        {"question": f"{statement} Answer with a python program in a ```python block.",
         "tests": [{"input": i, "output": o} for i, o in tests]}
        for statement, _, tests in CODE_PROBLEMS])
    _write_jsonl(data_dir / "codeio.jsonl", [
        {"problem": statement, "program": program, "tests": [{"input": i, "output": o} for i, o in tests]}
        for statement, program, tests in CODE_PROBLEMS])
    _write_jsonl(data_dir / "behaviour.jsonl", BEHAVIOUR_PROMPTS)
    _write_jsonl(data_dir / "corpus.jsonl", _corpus(rows))
    from zaya_train.data.tokenizer import train_bpe
    from zaya_train.rewards.reward_model import write_tiny_reward_model

    texts = [json.loads(line)["text"] for line in (data_dir / "corpus.jsonl").read_text().splitlines()]
    write_tiny_reward_model(data_dir / REWARD_MODEL_DIR, train_bpe(texts=texts, vocab_size=400), seed=seed)
    return data_dir
