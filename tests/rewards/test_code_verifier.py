"""CodeVerifier: scores and outcomes of programs that are right, half right, broken or hostile, one at a time and on
the worker pool. Sandboxed calls run under the hang guard of test_sandbox."""

from __future__ import annotations

import resource
import threading
import time
import uuid

import pytest

from tests.rewards.test_sandbox import finishes, needs_isolation, processes_with
from zaya_train.rewards import OUTCOMES, CodeVerifier, outcome_counts, sandbox
from zaya_train.rewards import code_verifier as code_verifier_module
from zaya_train.rewards.code_verifier import extract_program

ADDITION = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"},
                      {"input": "7 8\n", "output": " 15 \n\n"}, {"input": "4 3\n", "output": "7\n"}]}
CORRECT = "a, b = map(int, input().split())\nprint(a + b)"
HALF = "a, b = map(int, input().split())\nprint(a + b if a % 2 else a * b)"  # right on tests 1 and 3 only


def fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}\n```\nIt reads two integers."


@pytest.fixture(scope="module")
def verifier() -> CodeVerifier:
    return CodeVerifier(time_limit_s=1, memory_mb=256, max_workers=2)


@pytest.mark.parametrize(
    ("completion", "program"),
    [
        (fenced("print(1)"), "print(1)"),
        ("```py\nprint(1)\n```\n```python\nprint(2)\n```\n```text\n2\n```", "print(2)"),  # the last python block
        ("```\n    if True:\n        print(3)\n```", "if True:\n    print(3)"),  # bare fence, dedented
        ("print(4)\n", "print(4)"),  # no fence: the whole completion
        ("```python\nprint(1)\n```\nthen\n```python\nprint(5)", None),  # the last block was cut off
        ("```cpp\nint main() {}\n```", None),  # no python block
        ("```python\n\n```", None),
        ("   \n", None),
    ],
)
def test_extract_program(completion, program):
    assert extract_program(completion) == program


@needs_isolation
def test_a_correct_program_scores_1(verifier):
    run = finishes(verifier.run, fenced(CORRECT), ADDITION)
    assert (run.score, run.outcome) == (1.0, "passed")
    assert [t.status for t in run.tests] == ["passed"] * 4
    assert finishes(verifier.score, fenced(CORRECT), ADDITION) == 1.0


@needs_isolation
def test_a_half_correct_program_scores_half(verifier):
    run = finishes(verifier.run, fenced(HALF), ADDITION)
    assert (run.score, run.outcome) == (0.5, "failed")
    assert [t.status for t in run.tests] == ["passed", "failed", "passed", "failed"]


@needs_isolation
def test_all_or_nothing(verifier):
    strict = {**ADDITION, "all_or_nothing": True}
    assert finishes(verifier.run, fenced(HALF), strict).score == 0.0
    assert finishes(verifier.run, fenced(CORRECT), strict).score == 1.0


@needs_isolation
def test_a_syntax_error_scores_0(verifier):
    run = finishes(verifier.run, fenced("def f(:\n    print(1)"), ADDITION)
    assert (run.score, run.outcome) == (0.0, "crashed")
    assert "SyntaxError" in run.tests[0].detail


def test_no_code_scores_0_without_running_anything(verifier, monkeypatch):
    monkeypatch.setattr(code_verifier_module, "run_python", None)  # any attempt to run would raise TypeError
    for completion in ("", "```cpp\nint main() {}\n```", "```python\nprint(1)\n```\n```python\nprint("):
        run = verifier.run(completion, ADDITION)
        assert (run.score, run.outcome) == (0.0, "no_code")
        assert verifier.score(completion, ADDITION) == 0.0


@needs_isolation
def test_an_infinite_loop_times_out_and_its_process_is_gone(verifier):
    name = f"spin-{uuid.uuid4().hex}"
    # Re-executes itself with a name in its command line so the test can look for it in /proc afterwards.
    program = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'while True: pass', {name!r}])"
    run = finishes(verifier.run, fenced(program), {"tests": [{"input": "", "output": "1"}]})
    assert (run.score, run.outcome) == (0.0, "timeout")
    assert processes_with(name) == []


@needs_isolation
def test_a_sleeping_program_hits_the_wall_clock_limit(verifier):
    run = finishes(verifier.run, fenced("import time\ntime.sleep(600)"), {"tests": [{"input": "", "output": ""}]})
    assert (run.score, run.outcome) == (0.0, "timeout")


@needs_isolation
def test_allocating_10_gb_is_a_memory_failure(verifier):
    run = finishes(verifier.run, fenced("x = bytearray(10 * 1024**3)\nprint(len(x))"), ADDITION)
    assert (run.score, run.outcome) == (0.0, "memory")


@needs_isolation
def test_printing_1_gb_hits_the_output_limit_without_filling_the_callers_memory(verifier):
    program = "import sys\nline = 'x' * 1_000_000 + '\\n'\nfor _ in range(1000):\n    sys.stdout.write(line)"
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = finishes(verifier.run, fenced(program), {"tests": [{"input": "", "output": "x"}]})
    assert (run.score, run.outcome) == (0.0, "output_limit")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kb) / 1024
    assert grown_mb < 100, f"the caller's peak memory grew by {grown_mb:.0f} MB"


def test_a_malformed_reference_is_refused_not_raised(verifier):
    for reference in (None, {"tests": []}, {"tests": [{"input": 1, "output": "2"}]}, "3"):
        run = verifier.run(fenced(CORRECT), reference)
        assert (run.score, run.outcome) == (0.0, "refused") and "malformed reference" in run.reason
        assert verifier.score(fenced(CORRECT), reference) == 0.0


@needs_isolation
def test_the_worker_pool_runs_many_programs_at_once(verifier, monkeypatch):
    in_flight, peak, lock = 0, 0, threading.Lock()
    real_run = code_verifier_module.run_python

    def counting_run(*args, **kwargs):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            time.sleep(0.2)  # keeps each call in flight long enough for the pool's workers to overlap
            return real_run(*args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(code_verifier_module, "run_python", counting_run)
    kinds = {"passed": fenced(CORRECT), "failed": fenced(HALF), "crashed": fenced("raise SystemExit(3)"),
             "no_code": "The answer:\n```text\n42\n```"}
    expected = [kind for _ in range(4) for kind in kinds]
    pool = CodeVerifier(time_limit_s=1, memory_mb=256, max_workers=3)
    scored = finishes(pool.score_completions, [kinds[k] for k in expected], [ADDITION] * len(expected))
    assert [s.outcome for s in scored] == expected
    assert [s.reward for s in scored] == [{"passed": 1.0, "failed": 0.5}.get(k, 0.0) for k in expected]
    assert 1 < peak <= 3
    runs = finishes(pool.run_many, [kinds[k] for k in expected], [ADDITION] * len(expected))
    assert outcome_counts(runs) == {**dict.fromkeys(OUTCOMES, 0), "passed": 4, "failed": 4, "crashed": 4,
                                    "no_code": 4}


def test_refused_without_isolation_unless_unisolated_runs_are_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "UNSHARE", "/nonexistent/unshare")
    run = finishes(CodeVerifier(time_limit_s=1).run, fenced(CORRECT), ADDITION)
    assert (run.score, run.outcome) == (0.0, "refused") and "unshare" in run.reason
    run = finishes(CodeVerifier(time_limit_s=1, allow_unisolated=True).run, fenced(CORRECT), ADDITION)
    assert (run.score, run.outcome) == (1.0, "passed")
