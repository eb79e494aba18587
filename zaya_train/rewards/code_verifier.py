"""Rewards for code: the completion's Python program, run on the problem's tests in the sandbox.

    from zaya_train.rewards import CodeVerifier, outcome_counts
    v = CodeVerifier(time_limit_s=2, memory_mb=512, max_output_bytes=1 << 20)
    reference = {"tests": [{"input": "1 2\\n", "output": "3"}, {"input": "5 5\\n", "output": "10"}]}
    v.score("```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```", reference)   # -> 1.0
    run = v.run(completion, reference)          # CodeRun(score, outcome, tests=(CaseResult, ...), reason)
    v.score_completions(completions, references)  # [Scored(reward, outcome)], on a pool of max_workers sandboxes
    outcome_counts(v.run_many(completions, references))   # {"passed": 3, "timeout": 1, ...} for the metrics

The program is the last fenced Python block of the completion (```python, ```py, ```python3 or a bare ```), or
the whole completion when it has no fence at all; a completion whose last fence never closes was cut off and has
no program. It runs once per test, with the test's input on stdin, in zaya_train.rewards.sandbox (namespaces, a
fresh unprivileged uid, rlimits; its docstring has the threat model). A test passes when the program exits 0 and
its stdout equals the test's output after whitespace normalisation. The score is the fraction of tests passed;
`reference["all_or_nothing"]` makes it 1 when all pass, else 0.

Outcomes, one per completion, counted by the RL metrics: `passed` (every test), else the first failing test's
`failed` (wrong output), `timeout`, `memory`, `output_limit` or `crashed` (a nonzero exit, a syntax error, a
sandbox that broke); `no_code` (nothing to run); `refused` (the machine cannot isolate programs and
`allow_unisolated` is off, or the reference is malformed; `reason` says which). None of them raises.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from zaya_train.rewards.base import Scored, Verifier, normalize_whitespace
from zaya_train.rewards.sandbox import IsolationUnavailable, SandboxError, SandboxLimits, run_python

OUTCOMES = ("passed", "failed", "timeout", "memory", "output_limit", "crashed", "no_code", "refused")

_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
_BLOCK = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t\r]*$", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3")
_DETAIL_CHARS = 500


@dataclass(frozen=True)
class CaseResult:
    """One test: `passed`, `failed`, `timeout`, `memory`, `output_limit` or `crashed`, and the end of stderr."""

    status: str
    wall_s: float
    detail: str = ""


@dataclass(frozen=True)
class CodeRun:
    score: float
    outcome: str
    """One of OUTCOMES."""
    tests: tuple[CaseResult, ...] = ()
    reason: str = ""
    """Why the program did not run (`no_code`, `refused`, a broken sandbox)."""


def outcome_counts(runs: Iterable[CodeRun]) -> dict[str, int]:
    """How many runs ended in each outcome, every outcome present (zeros included) so metric keys are stable."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for run in runs:
        counts[run.outcome] += 1
    return counts


def extract_program(completion: str) -> str | None:
    """The last fenced Python block, or the whole completion when it has no fence; None if cut off or empty."""
    if not isinstance(completion, str):
        return None
    blocks = list(_BLOCK.finditer(completion))
    if not blocks:
        program = None if _FENCE.search(completion) else completion
    elif _FENCE.search(completion, blocks[-1].end()):
        program = None  # a fence opens after the last complete block and never closes: the completion was cut off
    else:
        programs = [m[2] for m in blocks if m[1].lower() in _PYTHON_TAGS]
        program = programs[-1] if programs else None
    if program is None or not program.strip():
        return None
    return textwrap.dedent(program).strip("\r\n")


def _tests_of(reference: Any) -> list[tuple[str, str]]:
    tests = reference.get("tests") if isinstance(reference, Mapping) else None
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"the reference needs a non-empty 'tests' list, got {type(reference).__name__}")
    for i, test in enumerate(tests):
        if not (isinstance(test, Mapping) and isinstance(test.get("input"), str)
                and isinstance(test.get("output"), str)):
            raise TypeError(f"test {i} is not {{'input': str, 'output': str}}: {test!r:.200}")
    return [(test["input"], test["output"]) for test in tests]


def _judge(status: str, stdout: bytes, stderr: bytes, wall_s: float, expected: str) -> CaseResult:
    if status == "ok":
        got = normalize_whitespace(stdout.decode("utf-8", "replace"))
        status = "passed" if got == normalize_whitespace(expected) else "failed"
    detail = "" if status == "passed" else stderr.decode("utf-8", "replace")[-_DETAIL_CHARS:]
    return CaseResult(status, wall_s, detail)


class CodeVerifier(Verifier):
    def __init__(
        self,
        time_limit_s: float = 5.0,
        memory_mb: int = 512,
        max_output_bytes: int = 1 << 20,
        *,
        max_file_mb: int = 16,
        max_processes: int = 32,
        max_workers: int = 4,
        allow_unisolated: bool = False,
    ):
        super().__init__(answer_marker=None)
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.limits = SandboxLimits(time_limit_s=time_limit_s, memory_mb=memory_mb,
                                    max_output_bytes=max_output_bytes, max_file_mb=max_file_mb,
                                    max_processes=max_processes)
        self.max_workers = max_workers
        self.allow_unisolated = allow_unisolated

    def extract_answer(self, completion: str) -> str | None:
        """The program (also what majority voting compares)."""
        return extract_program(completion)

    def run(self, completion: str, reference: Any) -> CodeRun:
        """Score, outcome and per-test results of one completion. Never raises."""
        program = self.extract_answer(completion)
        if program is None:
            return CodeRun(0.0, "no_code", reason="no program in the completion")
        return self.run_program(program, reference)

    def run_program(self, program: str, reference: Any) -> CodeRun:
        """`run` for a program already extracted. Never raises."""
        try:
            tests = _tests_of(reference)
        except (TypeError, ValueError) as err:
            return CodeRun(0.0, "refused", reason=f"malformed reference: {err}")
        try:
            executions = run_python(program, [i for i, _ in tests], self.limits,
                                    allow_unisolated=self.allow_unisolated)
        except IsolationUnavailable as err:
            return CodeRun(0.0, "refused", reason=f"cannot isolate programs here: {err}")
        # OSError: the host refused a process or a namespace (limits reached); the program is not to blame but
        # cannot be judged either.
        except (SandboxError, OSError) as err:
            return CodeRun(0.0, "crashed", reason=f"the sandbox failed: {err}")
        results = tuple(_judge(e.status, e.stdout, e.stderr_tail, e.wall_s, expected)
                        for e, (_, expected) in zip(executions, tests))
        passed = sum(r.status == "passed" for r in results)
        all_or_nothing = bool(reference.get("all_or_nothing", False))
        score = float(passed == len(results)) if all_or_nothing else passed / len(results)
        failing = next((r for r in results if r.status != "passed"), None)
        return CodeRun(score, "passed" if failing is None else failing.status, results)

    def _score_answer(self, answer: str, reference: Any) -> float:
        return self.run_program(answer, reference).score

    def run_many(self, completions: Sequence[str], references: Sequence[Any]) -> list[CodeRun]:
        """`run` over many completions, at most `max_workers` sandboxes at a time; results in input order."""
        return self._pooled(self.run, completions, references)

    def run_programs(self, programs: Sequence[str], references: Sequence[Any]) -> list[CodeRun]:
        """`run_program` over many programs, at most `max_workers` sandboxes at a time; results in input order."""
        return self._pooled(self.run_program, programs, references)

    def score_completions(self, completions: Sequence[str], references: Sequence[Any]) -> list[Scored]:
        """Rewards and outcomes of many completions (the batched interface of the RL loop)."""
        return [Scored(run.score, run.outcome) for run in self.run_many(completions, references)]

    def _pooled(self, fn: Callable[[str, Any], CodeRun], items: Sequence[str],
                references: Sequence[Any]) -> list[CodeRun]:
        if len(items) != len(references):
            raise ValueError(f"{len(items)} completions or programs but {len(references)} references")
        if not items:
            return []
        # Threads suffice: each worker only waits on its sandbox's process.
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(fn, items, references))
