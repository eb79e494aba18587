"""`recipe=nano_cascade`: the ZAYA1 RL cascade's stage recipes run back to back at toy size on a CPU.

    zaya-train recipe=nano_cascade run_dir=runs/nano_cascade/x
    zaya-train recipe=nano_cascade trainer.resume=auto run_dir=runs/nano_cascade/x   # skip finished stages

    run_dir/
      data/                   toy prompts of every stage, a pretraining corpus of them, a random reward model
      pretrain/               recipe=pretrain: the nano architecture with a byte-level BPE, on data/corpus.jsonl
      stage1_warmup/          recipe=zaya1_rl_stage1_warmup from pretrain/ (reasoning-gym puzzles + math, filtered)
      stage2_rlve/            recipe=zaya1_rl_stage2_rlve from stage1_warmup/ (the adaptive curriculum)
      stage3a_math_code_ttc/  recipe=zaya1_rl_stage3a_math_code_ttc (math, sandboxed code, CodeI/O, aggregation)
      stage3b_math_code_ttc/
      stage4_behavioral/      recipe=zaya1_rl_stage4_behavioral (reward model gated by the instruction checker)
      stages.json

Each RL stage runs its real recipe with toy sizes (the nano model, `cascade.prompts_per_step` x
`cascade.group_size`, `cascade.rl_steps` steps) and the toy data in place of the datasets the recipe asks for. At
this size rewards are mostly 0: the cascade shows that every stage runs, logs its rewards, checkpoints and hands its
model to the next, not that it learns.
"""

from __future__ import annotations

import time
from pathlib import Path

from zaya_train.cascade.config import CASCADE_STAGES
from zaya_train.cascade.toy import REWARD_MODEL_DIR, write_toy_data
from zaya_train.jobs import Job, print_summary, run_job, run_jobs


def _toy_rl(cfg, steps: int) -> list[str]:
    c = cfg.cascade
    return [
        "model=nano", "optim=adamw", "deepspeed=zero0", "rsa=nano", "logging=offline",
        f"wandb.mode={cfg.wandb.mode}", f"trainer.progress_bar={cfg.trainer.progress_bar}",
        f"trainer.resume={cfg.trainer.resume}", f"seed={cfg.seed}", f"trainer.max_steps={steps}",
        "trainer.save_interval=1", "trainer.keep_last=1", "optim.lr=1e-5", "schedule.warmup_steps=0",
        f"rl.prompts_per_step={c.prompts_per_step}", f"rl.group_size={c.group_size}",
        f"rl.max_new_tokens={c.max_new_tokens}", "rl.codesign.max_new_tokens=16", "rl.max_prompt_tokens=2048",
        "rl.filter.samples=2", "rl.filter.pool=8", "rl.code.max_workers=2", "rl.code.time_limit_s=2",
        "rl.code.memory_mb=256",
    ]


def _stage_data(stage: str, data: Path) -> list[str]:
    if stage == "stage1_warmup":
        return [f"rl.environments.4.data={data / 'math.jsonl'}", f"rl.environments.5.data={data / 'enigmata.jsonl'}"]
    if stage.startswith("stage3"):
        return [f"rl.environments.0.data={data / 'math.jsonl'}", f"rl.environments.1.data=code:{data / 'code.jsonl'}",
                f"rl.environments.2.data=codeio_output:{data / 'codeio.jsonl'}",
                f"rl.environments.3.data=codeio_input:{data / 'codeio.jsonl'}"]
    if stage == "stage4_behavioral":
        return [f"rl.environments.0.data=behaviour:{data / 'behaviour.jsonl'}",
                f"rl.reward_model.path={data / REWARD_MODEL_DIR}"]
    return []


def plan(cfg, run_dir: Path) -> list[Job]:
    c = cfg.cascade
    data = run_dir / "data"
    jobs: list[Job] = []
    previous = None
    for stage in CASCADE_STAGES:
        directory = run_dir / stage
        if stage in c.stages:
            if stage == "pretrain":
                overrides = [
                    "model=nano", "deepspeed=zero0", "logging=offline", f"wandb.mode={cfg.wandb.mode}",
                    f"trainer.progress_bar={cfg.trainer.progress_bar}", f"trainer.resume={cfg.trainer.resume}",
                    f"seed={cfg.seed}", f"data.path={data / 'corpus.jsonl'}", "data.bpe_vocab_size=512",
                    "data.seq_len=256", "data.micro_batch_size=8", f"trainer.max_steps={c.pretrain_steps}",
                    f"trainer.save_interval={c.pretrain_steps}", "trainer.log_interval=10", "optim.lr=3e-3",
                    "schedule.warmup_steps=5", "trainer.eval_problems=0",
                ]
            else:
                overrides = [*_toy_rl(cfg, c.rl_steps), f"model.init_from={previous}", *_stage_data(stage, data)]
            jobs.append(Job(stage, stage, CASCADE_STAGES[stage], directory,
                            tuple(overrides + list(c.overrides.get(stage, [])))))
        previous = directory
    return jobs


def run_cascade(cfg, run_dir: Path) -> dict[str, Path]:
    started = time.perf_counter()
    write_toy_data(run_dir / "data", cfg.seed)
    producers = {run_dir / stage: stage for stage in CASCADE_STAGES}
    record = run_jobs(plan(cfg, run_dir), run_dir, cfg.trainer.resume, "cascade", producers, run_job)
    outputs = {"stages": record.path, "data": run_dir / "data"}
    print_summary(f"nano cascade finished in {(time.perf_counter() - started) / 60:.1f} min: {run_dir}", record,
                  outputs)
    return outputs
