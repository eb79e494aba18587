"""The main job's stages: each one runs its own recipe in this process, in its own directory under `run_dir`.

    zaya-train                                                   # every stage, seed 0
    zaya-train stages=[pretrain,warmstart] run_dir=runs/nano/x   # a subset, in order
    zaya-train trainer.resume=auto run_dir=runs/nano/x           # skip finished stages, resume the interrupted one
    zaya-train seeds=[0,1]                                       # both RL arms and their evaluation per seed

    run_dir/
      pretrain/        recipe=nano_pretrain, experiment.pretrain_steps
      base/            recipe=nano_pretrain from pretrain/, fresh problems at experiment.anneal_lr: the base
      warmstart/       recipe=warmstart from the base (aggregation warm start)
      rl/seed<s>/plain_rl, rl/seed<s>/codesign_rl   recipe=rl from the warm start, stopped at equal compute
      eval/<model>/    recipe=eval_rsa (Markovian RSA, round 0..T), eval/seed<s>/<arm>/ for the arms
      export/          the co-design model (first seed) in Hugging Face format, with its tokenizer
      stages.json      which stages finished, their wall times
      report.md, results.json, rsa_scaling.png

Every stage prints the `zaya-train` command that reruns it alone.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zaya_train.experiment.config import ARMS, check_seeds, check_stages
from zaya_train.loading import latest_checkpoint

log = logging.getLogger("zaya_train")

STAGES_FILE = "stages.json"
EXPORT_DIR = "export"


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


@dataclass(frozen=True)
class Layout:
    run_dir: Path

    @property
    def pretrain(self) -> Path:
        return self.run_dir / "pretrain"

    def base(self, annealed: bool) -> Path:
        return self.run_dir / "base" if annealed else self.pretrain

    @property
    def warmstart(self) -> Path:
        return self.run_dir / "warmstart"

    def arm(self, seed: int, arm: str) -> Path:
        return self.run_dir / "rl" / f"seed{seed}" / arm

    def eval(self, model: str, seed: int | None = None) -> Path:
        return self.run_dir / "eval" / (model if seed is None else f"seed{seed}/{model}")


def _common(cfg) -> list[str]:
    """Overrides every stage takes from the main job: where it logs."""
    return [f"wandb.mode={cfg.wandb.mode}", f"wandb.project={cfg.wandb.project}"]


def _training_common(cfg) -> list[str]:
    return [*_common(cfg), f"trainer.progress_bar={cfg.trainer.progress_bar}", f"trainer.resume={cfg.trainer.resume}"]


def plan(cfg, run_dir: Path) -> list[Job]:
    """The recipe runs of the configured stages and seeds, in order."""
    ex = cfg.experiment
    stages = check_stages(list(cfg.stages))
    seeds = check_seeds(list(cfg.seeds) if cfg.seeds else [cfg.seed])
    layout = Layout(run_dir)
    annealed = ex.anneal_steps > 0
    base = layout.base(annealed)
    jobs: list[Job] = []

    def add(stage: str, key: str, recipe: str, directory: Path, overrides: list[str]) -> None:
        jobs.append(Job(stage, key, recipe, directory, tuple(overrides + ex.overrides.of(stage))))

    if "pretrain" in stages:
        pretrain = [*_training_common(cfg), f"seed={cfg.seed}", f"trainer.max_steps={ex.pretrain_steps}"]
        add("pretrain", "pretrain", "nano_pretrain", layout.pretrain,
            pretrain + [f"trainer.eval_problems={0 if annealed else ex.eval_problems}"])
        if annealed:
            # Fresh problems (another data seed) and a lower peak lr: the research base's second phase.
            add("pretrain", "base", "nano_pretrain", base, [
                *_training_common(cfg), f"seed={cfg.seed + 1}", f"trainer.max_steps={ex.anneal_steps}",
                f"model.init_from={layout.pretrain}", f"optim.lr={ex.anneal_lr}",
                f"schedule.warmup_steps={min(10, ex.anneal_steps)}", f"trainer.eval_problems={ex.eval_problems}",
            ])
    if "warmstart" in stages:
        add("warmstart", "warmstart", "warmstart", layout.warmstart, [
            *_training_common(cfg), f"seed={cfg.seed}", f"model.init_from={base}",
            f"trainer.max_steps={ex.warmstart_steps}", f"schedule.warmup_steps={min(10, ex.warmstart_steps)}",
            f"rl.warmstart.pool_problems={ex.warmstart_pool_problems}",
        ])
    arm_overrides = {
        "plain_rl": [f"rl.prompts_per_step={ex.plain_problems_per_step}", "rl.codesign.share=0.0"],
        "codesign_rl": [f"rl.prompts_per_step={ex.codesign_problems_per_step}",
                        f"rl.codesign.share={ex.codesign_share}", f"rl.codesign.rounds={ex.codesign_rounds}"],
    }
    for seed in seeds:
        for arm in ARMS:
            if arm in stages:
                add(arm, f"seed{seed}/{arm}", "rl", layout.arm(seed, arm), [
                    *_training_common(cfg), f"seed={seed}", f"model.init_from={layout.warmstart}",
                    f"rl.max_compute_tokens={ex.rl_compute_tokens}", f"trainer.max_steps={ex.rl_max_steps}",
                    f"optim.lr={ex.rl_lr}", f"rl.loss_aggregation={ex.rl_loss_aggregation}",
                    "rl.diagnostic_interval=10",
                    *arm_overrides[arm],
                ])
    if "eval" in stages:
        evaluated = [("base", None, base), ("warmstart", None, layout.warmstart)]
        evaluated += [(arm, seed, layout.arm(seed, arm)) for seed in seeds for arm in ARMS]
        for model, seed, source in evaluated:
            # One sampling seed for every model: differences between models are not differences of luck.
            add("eval", f"eval/{model}" if seed is None else f"eval/seed{seed}/{model}", "eval_rsa",
                layout.eval(model, seed), [
                    *_common(cfg), f"seed={cfg.seed}", f"checkpoint={source}", "eval=nano_chain_sum",
                    f"eval.data={'nano_chain_sum' if ex.eval_split == 'test' else 'nano_chain_sum:validation'}",
                    f"eval.num_problems={ex.eval_problems}", "rsa=nano", f"rsa.t={ex.eval_rounds}",
                    "eval.max_batch_size=512", f"eval.progress_bar={cfg.trainer.progress_bar}",
                ])
    return jobs


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


def _banner(text: str) -> None:
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

    summary = train(cfg, job.directory, source_factory=source_factory(job.recipe))
    if summary["reason"].startswith("signal"):
        raise StageInterrupted(job.key, summary["reason"])
    return summary


def run_main_job(cfg, run_dir: Path, run_job: Callable[[Job], dict[str, Any]] = run_job) -> dict[str, Path]:
    """Runs the configured stages (skipping finished ones under trainer.resume=auto), then writes the report
    when `eval` is among them. Returns the artifacts' paths."""
    from zaya_train.train.config import ConfigError

    run_dir.mkdir(parents=True, exist_ok=True)
    record = StageRecord(run_dir)
    if cfg.trainer.resume == "none" and record.jobs:
        raise ConfigError(f"trainer.resume: {run_dir} already holds a main job ({STAGES_FILE}); continue it with "
                          "trainer.resume=auto or choose a new run_dir")
    if cfg.trainer.resume not in ("auto", "none"):
        raise ConfigError("trainer.resume: the main job resumes its own stages: auto (skip finished stages, resume "
                          f"the interrupted one) or none, got {cfg.trainer.resume!r}")
    jobs = plan(cfg, run_dir)
    _check_inputs(jobs)
    from zaya_train.cli import compose_run_config

    for job in jobs:  # a typo in experiment.overrides fails now, not after the stages before it
        compose_run_config(job.recipe, [*job.overrides, f"run_dir={job.directory}"], build=False)
    started = time.perf_counter()
    pending = [job for job in jobs if not (cfg.trainer.resume == "auto" and record.done(job.key))]
    for job in jobs:
        if job not in pending:
            print(f"{job.key}: finished in an earlier run ({job.directory}), skipped", flush=True)
    for index, job in enumerate(pending, 1):
        source = _checkpoint_source(job)
        if job.recipe == "eval_rsa" and (source is None or latest_checkpoint(source) is None):
            print(f"{job.key}: no model in {source}; not evaluated", flush=True)
            continue
        _banner(f"[{index}/{len(pending)}] {job.stage}: {job.key}")
        print(f"  {job.command()}", flush=True)
        start = time.perf_counter()
        summary = run_job(job)
        record.finish(job, time.perf_counter() - start, summary)
    outputs: dict[str, Path] = {"stages": record.path}
    if "eval" in cfg.stages:
        from zaya_train.experiment.collect import collect_and_report

        _banner("report")
        outputs.update(collect_and_report(cfg, run_dir, record.jobs))
    _summary(outputs, run_dir, record, time.perf_counter() - started)
    return outputs


def _check_inputs(jobs: list[Job]) -> None:
    """Every training job's starting model exists or is made by an earlier job, before anything runs."""
    from zaya_train.train.config import ConfigError

    made = set()
    for job in jobs:
        source = _checkpoint_source(job)
        if job.recipe != "eval_rsa" and source is not None and source not in made and latest_checkpoint(source) is None:
            producer = {"base": "pretrain", "pretrain": "pretrain", "warmstart": "warmstart"}.get(source.name, "?")
            raise ConfigError(f"stages: {job.key} starts from {source}, which holds no checkpoint; add stage "
                              f"{producer} (stages=[{producer},...]) or point run_dir at a run that has it")
        made.add(job.directory)


def _summary(outputs: dict[str, Path], run_dir: Path, record: StageRecord, wall_s: float) -> None:
    _banner(f"main job finished in {wall_s / 60:.1f} min: {run_dir}")
    for key, value in record.jobs.items():
        print(f"  {key:<24} {value['wall_s']:>7.1f} s  {value['directory']}")
    for name, path in outputs.items():
        print(f"  {name:<24} {path}")
    print(flush=True)


def interrupted_exit_code(err: StageInterrupted) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended; 1 if another rank got it."""
    name = err.reason.removeprefix("signal ")
    return 128 + signal.Signals[name] if name in signal.Signals.__members__ else 1
