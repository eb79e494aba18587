"""CodeI/O environments (ZAYA1 code auxiliary tasks): predict a program's output, or an input that yields an output.

    from zaya_train.rewards import CodeVerifier
    from zaya_train.rewards.codeio import codeio_rows, codeio_verifier
    rows = codeio_rows("seeds.jsonl", "codeio_output")     # [(question, reference), ...], one per (seed, test)
    verifier = codeio_verifier("codeio_output", CodeVerifier(time_limit_s=2))
    verifier.score(completion, rows[0][1])                 # 1.0 or 0.0
    # as an RL prompt source: PromptSource(rows, verifier, seed, shuffle_rows=True)

A seed is a jsonl row `{"problem": statement, "program": Python reading stdin, "tests": [{"input", "output"}, ...]}`,
optionally with `"input_pattern"`: a regular expression that every valid input matches in full (its schema).

`codeio_output`: the question shows the problem, the program and one test's input and asks what the program
prints; the reference is that test's output. The answer (the last `\\boxed{}`, else the text after the last
`Answer:`, with one enclosing code fence removed) must equal it after whitespace normalisation. No code runs.

`codeio_input`: the question shows the problem, the program and one test's output and asks for an input on which
the program prints it; the reference is `{"program", "output", "input_pattern"}`. The proposed input keeps its
line breaks; it must match `input_pattern` (ends stripped) when the seed has one, then the program runs on it in
the sandbox of the given CodeVerifier and its output must equal the target after whitespace normalisation.

Both rewards are binary. Tests whose output (output task) or input (input task) is blank give no row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zaya_train.rewards.base import Scored, Verifier, extract_final_answer
from zaya_train.rewards.code_verifier import CodeRun, CodeVerifier
from zaya_train.rewards.exact_match import ExactMatchVerifier

TASKS = ("codeio_output", "codeio_input")
ANSWER_MARKER = "Answer:"

_ENCLOSING_FENCE = re.compile(r"\A```[^\n]*\n(.*?)\n?```\Z", re.DOTALL)

_OUTPUT_QUESTION = """\
Here is a programming problem and a Python program written for it.

Problem:
{problem}

Program:
```python
{program}
```

The program is run with this standard input:
```
{input}
```

What exactly does it print? Reason step by step, then end your reply with `{marker}` followed by the exact output \
and nothing after it."""

_INPUT_QUESTION = """\
Here is a programming problem and a Python program written for it.

Problem:
{problem}

Program:
```python
{program}
```

Find a standard input, valid for the problem, on which the program prints exactly:
```
{output}
```

Reason step by step, then end your reply with `{marker}` followed by the input exactly as it would be typed on \
standard input (line breaks included) and nothing after it."""


def final_answer(completion: str, answer_marker: str | None = ANSWER_MARKER) -> str | None:
    """The final answer with its layout kept: the last box or the text after the marker, one enclosing code fence
    removed, ends stripped; None when absent or empty."""
    answer = extract_final_answer(completion, answer_marker)
    if answer is None:
        return None
    fenced = _ENCLOSING_FENCE.match(answer)
    answer = (fenced[1] if fenced else answer).strip()
    return answer or None


def _validated_seed(seed: Any, where: str) -> dict[str, Any]:
    if not isinstance(seed, Mapping):
        raise TypeError(f"{where}: a seed is a JSON object, got {type(seed).__name__}")
    for key in ("problem", "program"):
        if not isinstance(seed.get(key), str) or not seed[key].strip():
            raise ValueError(f"{where}: '{key}' must be a non-empty string (keys: {sorted(seed)})")
    tests = seed.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"{where}: 'tests' must be a non-empty list")
    for i, test in enumerate(tests):
        if not (isinstance(test, Mapping) and isinstance(test.get("input"), str)
                and isinstance(test.get("output"), str)):
            raise TypeError(f"{where}: test {i} is not {{'input': str, 'output': str}}")
    pattern = seed.get("input_pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"{where}: input_pattern={pattern!r} is not a regular expression ({err})") from err
    return dict(seed)


def read_seeds(path: str | Path) -> list[dict[str, Any]]:
    """The seeds of a jsonl file, each checked; ValueError naming the line of the first bad one."""
    seeds = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from err
            seeds.append(_validated_seed(row, f"{path}:{n}"))
    if not seeds:
        raise ValueError(f"{path}: no seeds")
    return seeds


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def codeio_rows(seeds: str | Path | Sequence[Mapping[str, Any]], task: str) -> list[tuple[str, Any]]:
    """(question, reference) rows of `task` for every usable test of every seed (a jsonl path or the seeds)."""
    _check_task(task)
    if isinstance(seeds, (str, Path)):
        seeds = read_seeds(seeds)
    else:
        seeds = [_validated_seed(s, f"seed {i}") for i, s in enumerate(seeds)]
    rows: list[tuple[str, Any]] = []
    for seed in seeds:
        for test in seed["tests"]:
            shown = {"problem": seed["problem"].strip(), "program": seed["program"].strip("\n"),
                     "marker": ANSWER_MARKER}
            if task == "codeio_output" and test["output"].strip():
                question = _OUTPUT_QUESTION.format(**shown, input=test["input"].rstrip("\n"))
                rows.append((question, test["output"]))
            elif task == "codeio_input" and test["input"].strip():
                question = _INPUT_QUESTION.format(**shown, output=test["output"].rstrip("\n"))
                rows.append((question, {"program": seed["program"], "output": test["output"],
                                        "input_pattern": seed.get("input_pattern")}))
    if not rows:
        raise ValueError(f"no seed has a test usable for {task}")
    return rows


def codeio_verifier(task: str, code_verifier: CodeVerifier | None = None) -> Verifier:
    """The verifier of `task`; the input task runs programs with `code_verifier`'s sandbox settings."""
    _check_task(task)
    return CodeIOOutputVerifier() if task == "codeio_output" else CodeIOInputVerifier(code_verifier)


class CodeIOOutputVerifier(ExactMatchVerifier):
    """Output prediction: the final answer equals the reference output after whitespace normalisation."""

    def __init__(self, answer_marker: str = ANSWER_MARKER):
        super().__init__(answer_marker)

    def extract_answer(self, completion: str) -> str | None:
        answer = final_answer(completion, self.answer_marker)
        return None if answer is None else self._canonical(answer)


class CodeIOInputVerifier(Verifier):
    """Input prediction: the reference program, run in the sandbox on the proposed input, prints the target."""

    def __init__(self, code_verifier: CodeVerifier | None = None, answer_marker: str = ANSWER_MARKER):
        super().__init__(answer_marker)
        self.code_verifier = code_verifier or CodeVerifier()

    def extract_answer(self, completion: str) -> str | None:
        """The proposed input, line breaks kept (whitespace inside an input can matter to the program)."""
        return final_answer(completion, self.answer_marker)

    def run(self, completion: str, reference: Any) -> CodeRun:
        """Score and outcome of one completion, as CodeVerifier.run (`no_code`: no proposed input). Never raises."""
        return self.run_many([completion], [reference])[0]

    def run_many(self, completions: Sequence[str], references: Sequence[Any]) -> list[CodeRun]:
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        return self._run([self._job(self.extract_answer(c), r) for c, r in zip(completions, references)])

    def score_completions(self, completions: Sequence[str], references: Sequence[Any]) -> list[Scored]:
        """Rewards and outcomes of many completions (the batched interface of the RL loop)."""
        return [Scored(run.score, run.outcome) for run in self.run_many(completions, references)]

    def _score_answer(self, answer: str, reference: Any) -> float:
        return self._run([self._job(answer, reference)])[0].score

    def _job(self, answer: str | None, reference: Any) -> CodeRun | tuple[str, dict[str, Any]]:
        """What to run for a proposed input (program, one-test reference), or the CodeRun when nothing can run."""
        if answer is None:
            return CodeRun(0.0, "no_code", reason="no proposed input in the completion")
        if not (isinstance(reference, Mapping) and isinstance(reference.get("program"), str)
                and isinstance(reference.get("output"), str)):
            return CodeRun(0.0, "refused", reason=f"malformed reference: {reference!r:.200}")
        pattern = reference.get("input_pattern")
        try:
            matches = pattern is None or re.fullmatch(pattern, answer) is not None
        except (re.error, TypeError) as err:
            return CodeRun(0.0, "refused", reason=f"malformed reference: input_pattern={pattern!r} ({err})")
        if not matches:
            return CodeRun(0.0, "failed", reason="the proposed input does not match the problem's input pattern")
        return reference["program"], {"tests": [{"input": answer + "\n", "output": reference["output"]}]}

    def _run(self, jobs: list[CodeRun | tuple[str, dict[str, Any]]]) -> list[CodeRun]:
        pending = [job for job in jobs if isinstance(job, tuple)]
        ran = iter(self.code_verifier.run_programs([p for p, _ in pending], [r for _, r in pending]))
        return [next(ran) if isinstance(job, tuple) else job for job in jobs]
