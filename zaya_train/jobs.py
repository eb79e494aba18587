"""Multi-stage jobs: a plan of recipe runs executed in one process, each in its own directory, with a record of the
finished ones so that an interrupted job continues where it stopped.

    jobs = [Job("pretrain", "pretrain", "nano_pretrain", run_dir / "pretrain", ("trainer.max_steps=100",)), ...]
    record = run_jobs(jobs, run_dir, resume="auto", what="main job")   # skips jobs stages.json marks done

Used by the main job (zaya_train.experiment) and the nano RL cascade (zaya_train.cascade). Every job prints the
`zaya-train` command that reruns it alone; a signal stops the job after its checkpoint and raises StageInterrupted.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zaya_train.loading import latest_checkpoint

STAGES_FILE = "stages.json"


class StageInterrupted(RuntimeError):
    """A stage stopped on a signal, after writing a checkpoint; `trainer.resume=auto` continues it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"stage {key} stopped ({reason})")
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One recipe run of a stage: `key` names it in stages.json, `directory` holds its outputs."""

    stage: str
    key: str
    recipe: str
    directory: Path
    overrides: tuple[str, ...]

    def command(self) -> str:
        args = [f"recipe={self.recipe}", *self.overrides, f"run_dir={self.directory}"]
        return "zaya-train " + " ".join(shlex.quote(a) for a in args)


def _checkpoint_source(job: Job) -> Path | None:
    """The model a job starts from or evaluates: the last value given, as Hydra applies overrides in order."""
    for value in reversed(job.overrides):
        key, _, path = value.partition("=")
        if key in ("model.init_from", "checkpoint"):
            return Path(path)
    return None


class StageRecord:
    """`run_dir/stages.json`: finished jobs with their wall time and summary, rewritten after each job."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STAGES_FILE
        self.jobs: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, key: str) -> bool:
        return self.jobs.get(key, {}).get("done", False)

    def finish(self, job: Job, wall_s: float, summary: dict[str, Any]) -> None:
        self.jobs[job.key] = {"done": True, "stage": job.stage, "wall_s": round(wall_s, 1),
                              "directory": str(job.directory), "command": job.command(), **summary}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.jobs, indent=2) + "\n")
        os.replace(tmp, self.path)


def banner(text: str) -> None:
    line = "=" * min(100, max(60, len(text) + 4))
    print(f"\n{line}\n  {text}\n{line}", flush=True)


def run_job(job: Job) -> dict[str, Any]:
    """Runs one recipe in this process; returns a JSON-able summary. Raises StageInterrupted on a signal."""
    from zaya_train.cli import compose_run_config

    cfg = compose_run_config(job.recipe, [*job.overrides, f"run_dir={job.directory}"])
    if job.recipe == "eval_rsa":
        from zaya_train.rsa.harness import run_eval

        rounds = run_eval(cfg, job.directory)["rounds"]
        accuracies = ", ".join(f"round {r['round']} {r['mean_accuracy']:.3f}" for r in rounds)
        print(f"{job.key}: Markovian RSA mean accuracy {accuracies}", flush=True)
        return {"mean_accuracy": [r["mean_accuracy"] for r in rounds]}
    from zaya_train.cli import source_factory
    from zaya_train.train.trainer import train

    summary = train(cfg, job.directory, source_factory=source_factory(cfg.recipe))
    if summary["reason"].startswith("signal"):
        raise StageInterrupted(job.key, summary["reason"])
    return summary


def interrupted_exit_code(err: StageInterrupted) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended; 1 if another rank got it."""
    name = err.reason.removeprefix("signal ")
    return 128 + signal.Signals[name] if name in signal.Signals.__members__ else 1


def run_jobs(jobs: list[Job], run_dir: Path, resume: str, what: str, producers: dict[Path, str],
             run_job: Callable[[Job], dict[str, Any]] = run_job) -> StageRecord:
    """Runs `jobs` in order; under resume=auto the ones run_dir/stages.json marks finished are skipped and an
    interrupted one resumes from its checkpoint. `producers`: which stage makes each model directory, for the error
    when a job's starting model is missing. Checks every job's config before the first runs."""
    from zaya_train.cli import compose_run_config
    from zaya_train.train.config import ConfigError

    run_dir.mkdir(parents=True, exist_ok=True)
    record = StageRecord(run_dir)
    if resume == "none" and record.jobs:
        raise ConfigError(f"trainer.resume: {run_dir} already holds a {what} ({STAGES_FILE}); continue it with "
                          "trainer.resume=auto or choose a new run_dir")
    if resume not in ("auto", "none"):
        raise ConfigError(f"trainer.resume: the {what} resumes its own stages: auto (skip finished stages, resume "
                          f"the interrupted one) or none, got {resume!r}")
    _check_inputs(jobs, producers)
    for job in jobs:  # a typo in a stage's overrides fails now, not after the stages before it
        compose_run_config(job.recipe, [*job.overrides, f"run_dir={job.directory}"], build=False)
    pending = [job for job in jobs if not (resume == "auto" and record.done(job.key))]
    for job in jobs:
        if job not in pending:
            print(f"{job.key}: finished in an earlier run ({job.directory}), skipped", flush=True)
    for index, job in enumerate(pending, 1):
        source = _checkpoint_source(job)
        if job.recipe == "eval_rsa" and (source is None or latest_checkpoint(source) is None):
            print(f"{job.key}: no model in {source}; not evaluated", flush=True)
            continue
        banner(f"[{index}/{len(pending)}] {job.stage}: {job.key}")
        print(f"  {job.command()}", flush=True)
        start = time.perf_counter()
        summary = run_job(job)
        record.finish(job, time.perf_counter() - start, summary)
    return record


def _check_inputs(jobs: list[Job], producers: dict[Path, str]) -> None:
    """Every training job's starting model exists or is made by an earlier job, before anything runs."""
    from zaya_train.train.config import ConfigError

    made = set()
    for job in jobs:
        source = _checkpoint_source(job)
        if job.recipe != "eval_rsa" and source is not None and source not in made and latest_checkpoint(source) is None:
            producer = producers.get(source, "?")
            raise ConfigError(f"stages: {job.key} starts from {source}, which holds no checkpoint; add stage "
                              f"{producer} (stages=[{producer},...]) or point run_dir at a run that has it")
        made.add(job.directory)


def print_summary(title: str, record: StageRecord, outputs: dict[str, Path]) -> None:
    banner(title)
    for key, value in record.jobs.items():
        print(f"  {key:<24} {value['wall_s']:>7.1f} s  {value['directory']}")
    for name, path in outputs.items():
        print(f"  {name:<24} {path}")
    print(flush=True)
