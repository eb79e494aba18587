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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zaya_train.experiment.config import ARMS, check_seeds, check_stages
from zaya_train.jobs import Job, banner, print_summary, run_job, run_jobs

EXPORT_DIR = "export"


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


def run_main_job(cfg, run_dir: Path, run_job: Callable[[Job], dict[str, Any]] = run_job) -> dict[str, Path]:
    """Runs the configured stages (skipping finished ones under trainer.resume=auto), then writes the report
    when `eval` is among them. Returns the artifacts' paths."""
    started = time.perf_counter()
    layout = Layout(run_dir)
    producers = {layout.pretrain: "pretrain", layout.base(True): "pretrain", layout.warmstart: "warmstart"}
    record = run_jobs(plan(cfg, run_dir), run_dir, cfg.trainer.resume, "main job", producers, run_job)
    outputs: dict[str, Path] = {"stages": record.path}
    if "eval" in cfg.stages:
        from zaya_train.experiment.collect import collect_and_report

        banner("report")
        outputs.update(collect_and_report(cfg, run_dir, record.jobs))
    print_summary(f"main job finished in {(time.perf_counter() - started) / 60:.1f} min: {run_dir}", record, outputs)
    return outputs
