"""`recipe=build_aggregation_sft`: the data of the co-design SFT cold start (stage 0; the ZAYA1-8B report,
arXiv 2605.05365, section VI-B), aggregation prompts over teacher rollouts whose target is an aggregated
rollout the teacher writes, kept whether it is right or not.

    zaya-train recipe=build_aggregation_sft aggregation_sft.problems=problems.jsonl \\
        aggregation_sft.teacher=exports/teacher aggregation_sft.samples_per_problem=2 run_dir=runs/agg
    zaya-train recipe=zaya1_sft data.mix_path=runs/agg/aggregation_sft.jsonl data.mix_share=0.05 ...

Input: a jsonl of problems, each with several teacher rollouts (texts):

    {"question": "...", "answer": "42", "rollouts": ["...", "...", ...]}        # "answer" is optional

For each problem, `aggregation_sft.samples_per_problem` times: rsa.c of its rollouts are chosen (a random
subset per sample, from `seed` and the problem's line number), each is cut to its tau-token tail and the
round-1 aggregation prompt is built over them, all by `zaya_train.rsa.population_prompts`, the function RL and
`recipe=eval_rsa` build their prompts with (the same `rsa.*` template, tail cut, EOS stripping and truncation
marker). The teacher (`aggregation_sft.teacher`: an HF `zaya` directory, a trainer checkpoint or a run
directory) continues each prompt through the rollout engine. A row that is not JSON, has no question or fewer
than rsa.c rollouts is skipped and counted (the summary gives the reasons and the first line numbers); the run
fails only when no row is usable. Nothing is trained.

Output, in run_dir (the chats are written under a temporary name, renamed when complete):

    aggregation_sft.jsonl          one row per chat:
      {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": TARGET}],
       "problem": LINE, "parents": [rollout indices, in prompt order], "finished": bool,
       "correct": bool | null}
    aggregation_sft_summary.json   problems, skipped (by reason), chats, finished, scored, correct,
                                   share_correct, reencoded_differently

`correct` is `aggregation_sft.verifier`'s verdict on the target when the row has an answer, else null; it
filters nothing (the report trains on the teacher's output whatever it is worth).

Chat message or raw prompt. RL and evaluation feed an aggregation prompt as raw tokens, `[BOS] +
template(question, tails)`, and let the model continue it: no chat template, no role markers. The teacher is
fed exactly that here, and `recipe=zaya1_sft` (`data.mix_path`, zaya_train/data/mixing.py) trains on exactly
that shape, `[BOS] + prompt + target (+ EOS)`, not on the chat template that wraps ordinary chats, so the cold
start teaches the sequence the model continues at RL and test time. The file keeps the `messages` layout so
that it reads like any SFT data, but it is meant for `data.mix_path`, not `data.path` (which would wrap it in
the chat template). PROMPT is the prompt's ids decoded (BOS left out), and the student's tokenizer encodes it
again; the teacher's tokenizer gives back the same ids unless BPE merges across a seam between a template
piece and a tail: `reencoded_differently` counts the chats (prompt or target) where it would not. TARGET
leaves out the teacher's EOS; `finished` says whether the teacher ended with EOS or ran out of
`aggregation_sft.max_new_tokens`, and the mix appends EOS to finished targets only.

Determinism: prompts go to the teacher in file order, in chunks of `aggregation_sft.max_batch_size`, chunk j
sampled with seed `chunk_seed(seed, j)`; the same file, seed and settings give the same rows. On a GPU the
teacher runs in bf16, as RL's rollout copies do.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from zaya_train.loading import load_model_and_tokenizer
from zaya_train.rewards import ExactMatchVerifier, MathVerifier, Verifier
from zaya_train.rollout import RolloutEngine, RolloutResult
from zaya_train.rsa.core import RSAProblem, population_prompts, stable_hash64
from zaya_train.rsa.template import build_template

CHATS_FILE = "aggregation_sft.jsonl"
SUMMARY_FILE = "aggregation_sft_summary.json"
MAX_SKIP_EXAMPLES = 20
COUNTS = ("chats", "finished", "scored", "correct", "reencoded_differently")


class ProblemsFileError(ValueError):
    """The problems file holds no usable row; the message names `aggregation_sft.problems`."""


@dataclass
class Problem:
    line: int
    question: str
    answer: str | None
    rollouts: list[str]


@dataclass
class Prompt:
    problem: Problem
    prompt_ids: list[int]
    """What the teacher is fed, BOS included."""
    parents: tuple[int, ...]


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of the teacher's `chunk`-th call (31 bits, which every sampler accepts)."""
    return stable_hash64("aggregation_sft", seed, chunk) & 0x7FFF_FFFF


def _problem(row: Any, line: int, min_rollouts: int) -> Problem | str:
    """The problem of one parsed row, or the reason it is skipped."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"]:
        return "no_question"
    rollouts = row.get("rollouts")
    if not isinstance(rollouts, list) or not all(isinstance(r, str) for r in rollouts):
        return "no_rollouts"
    if len(rollouts) < min_rollouts:
        return "too_few_rollouts"
    answer = row.get("answer")
    return Problem(line, row["question"], None if answer is None else str(answer), rollouts)


def read_problems(
    path: str | Path, min_rollouts: int, skipped: Counter, examples: list[str]
) -> Iterator[Problem]:
    """The usable problems of a jsonl file, in file order, read lazily (the file may be large). Skipped rows
    are counted in `skipped` by reason; the first few go to `examples` as "line N: reason"."""
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                found = _problem(json.loads(text), line, min_rollouts)
            except json.JSONDecodeError:
                found = "bad_json"
            if isinstance(found, str):
                skipped[found] += 1
                if len(examples) < MAX_SKIP_EXAMPLES:
                    examples.append(f"line {line}: {found}")
                continue
            yield found


def _teacher(path: str) -> tuple[RolloutEngine, Any]:
    model, tokenizer = load_model_and_tokenizer(path)
    if torch.cuda.is_available():
        # bf16 weights on the GPU, as RL's rollout copies hold them; the routers' balancing biases stay fp32.
        model = model.to(device="cuda", dtype=torch.bfloat16)
        for router in model.routers():
            router.balancing_biases = router.balancing_biases.float()
    return RolloutEngine(model.eval()), tokenizer


class _ChatWriter:
    """Turns the teacher's results into chat rows on `out` and counts them."""

    def __init__(self, out: IO[str], tokenizer: Any, verifier: Verifier, bos: list[int]) -> None:
        self.out, self.tokenizer, self.verifier, self.bos = out, tokenizer, verifier, bos
        self.counts: Counter = Counter()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def write(self, prompt: Prompt, result: RolloutResult) -> None:
        finished = result.finish_reason == "eos"
        target_ids = list(result.token_ids[:-1] if finished else result.token_ids)
        prompt_ids = prompt.prompt_ids[len(self.bos):]
        user, assistant = self.decode(prompt_ids), self.decode(target_ids)
        answer = prompt.problem.answer
        correct = None
        if answer is not None:
            text = self.tokenizer.decode(target_ids, skip_special_tokens=True)
            correct = self.verifier.score(text, answer) == 1.0
        row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
               "problem": prompt.problem.line, "parents": list(prompt.parents), "finished": finished,
               "correct": correct}
        self.out.write(json.dumps(row, ensure_ascii=False) + "\n")
        reencoded = self.encode(user) != prompt_ids or self.encode(assistant) != target_ids
        self.counts.update(chats=1, finished=finished, scored=answer is not None, correct=bool(correct),
                           reencoded_differently=reencoded)


def build_aggregation_sft(cfg, run_dir: Path) -> dict[str, Any]:
    """`cfg` is the run config (`aggregation_sft`, `rsa`, `seed`). Writes the chats and the summary into
    `run_dir` (see the module docstring) and returns the summary. Raises ProblemsFileError when no row is
    usable."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opts = cfg.aggregation_sft
    engine, tokenizer = _teacher(opts.teacher)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rsa = cfg.rsa.stripping([tokenizer.eos_token_id])
    verifier = (MathVerifier if opts.verifier == "math" else ExactMatchVerifier)(opts.answer_marker)
    skipped: Counter = Counter()
    skip_examples: list[str] = []
    k, size = opts.samples_per_problem, opts.max_batch_size
    with open(opts.problems, "rb") as handle:
        rows = sum(1 for text in handle if text.strip())
    bar = tqdm(total=rows * k, desc="teacher aggregation", unit="prompt", disable=not opts.progress_bar)
    tmp = run_dir / f".{CHATS_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        writer = _ChatWriter(out, tokenizer, verifier, bos)
        template = build_template(rsa.template, writer.encode, max_candidates=rsa.c)

        def generate(prompts: list[Prompt], chunk: int) -> None:
            results = engine.generate(
                [p.prompt_ids for p in prompts], max_new_tokens=opts.max_new_tokens,
                temperature=opts.temperature, top_p=opts.top_p, seed=chunk_seed(cfg.seed, chunk),
                eos_token_id=tokenizer.eos_token_id, max_batch_size=size,
            )
            for prompt, result in zip(prompts, results):
                writer.write(prompt, result)
            bar.total = (rows - sum(skipped.values())) * k  # skipped rows have no prompts
            bar.update(len(prompts))

        pending: list[Prompt] = []
        chunk = problems = 0
        for problem in read_problems(opts.problems, rsa.c, skipped, skip_examples):
            problems += 1
            question_ids = writer.encode(problem.question)
            built = population_prompts(
                RSAProblem(problem.line, bos + question_ids, question_ids, problem.answer),
                [writer.encode(r) for r in problem.rollouts], 1, k, rsa, template, seed=cfg.seed, bos_ids=bos,
            )
            pending += [Prompt(problem, p.prompt_ids, p.parents) for p in built]
            while len(pending) >= size:
                generate(pending[:size], chunk)
                pending, chunk = pending[size:], chunk + 1
        if pending:
            generate(pending, chunk)
    bar.close()
    if not problems:
        tmp.unlink()
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "no rows"
        raise ProblemsFileError(
            f"aggregation_sft.problems: no usable problem in {opts.problems} ({reasons}; each row needs a "
            f"question and at least rsa.c={rsa.c} rollouts; e.g. {skip_examples[:3]})"
        )
    os.replace(tmp, run_dir / CHATS_FILE)
    counts = writer.counts
    summary = {
        "chats_file": str(run_dir / CHATS_FILE),
        "problems": problems,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": skip_examples,
        **{key: counts[key] for key in COUNTS},
        "share_correct": counts["correct"] / counts["scored"] if counts["scored"] else None,
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
