"""Plain RL on the nano task: our `recipe=rl` against TRL's `GRPOTrainer` on the same weights, side by side, CPU.

    pip install -e ".[bench]"                                    # TRL, for this benchmark only
    python benchmarks/rl_vs_trl.py --init-from runs/nano/<base run>
    python benchmarks/rl_vs_trl.py --problems 8 --steps 3          # a random policy, smaller batches

Both start from one set of weights (a trainer checkpoint or HF directory; by default a random nano model): ours
loads it as `model.init_from`, TRL gets transformers' own `ZayaForCausalLM` loaded from its HF export. Same
problems of the nano task (the same problem indices, in the same order), group size, 61 new tokens, temperature 1,
top-p 1, one AdamW step per batch at the same learning rate, r - mean advantages (TRL: `scale_rewards="none"`),
token-level loss normalisation (TRL: `loss_type="dapo"`), no KL (`beta=0`), the same exact-answer reward. TRL
generates through transformers' `generate`; we generate through our rollout engine with its decode step compiled
(`rl.compile_decode=true`, compiled in the warm-up step; `--eager-decode` without). RL samples per second counts
generated sequences over the wall time of the steps after the first (warm-up) one, for each side (ours: the
trainer's `time/step_s`, the whole loop; TRL: between its step-end callbacks). Both reward
curves are printed step by step.

The machine's speed drifts by tens of percent over a minute on shared hosts, so the two sides run `--rounds` times,
alternately (TRL first in even rounds, ours first in odd ones), each round giving one ratio of the two rates
measured next to each other. Every measurement is a fresh process, so each side runs with what its framework sets
up and nothing else: ours keeps freed memory in glibc's heap (zaya_train.train.allocator), TRL runs with glibc's
defaults unless the environment says otherwise (MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647
give both sides the same allocator). The last line is `ratio=<median over rounds of our samples/s / TRL samples/s>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from zaya_train.cli import compose_run_config
from zaya_train.data import NANO_CHARS, char_tokenizer
from zaya_train.hf import save_pretrained
from zaya_train.loading import load_model_and_tokenizer
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rl.loop import RLSource
from zaya_train.rl.prompts import nano_verifier, prompt_source
from zaya_train.train.trainer import train


def hf_policy(init_from: str | None, path: Path) -> Path:
    """An HF directory (weights + tokenizer) holding the starting policy."""
    if init_from is not None:
        model, tokenizer = load_model_and_tokenizer(init_from)
    else:
        tokenizer = char_tokenizer(NANO_CHARS)
        model = ZayaForCausalLM(preset("nano", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    return path


def run_ours(policy: Path, args, tmp: Path) -> tuple[list[float], float]:
    cfg = compose_run_config("rl", [
        f"model.init_from={policy}", f"run_dir={tempfile.mkdtemp(dir=tmp)}", f"trainer.max_steps={args.steps}",
        "trainer.progress_bar=false", "wandb.mode=disabled", f"rl.prompts_per_step={args.problems}",
        f"rl.group_size={args.group}", "rl.max_new_tokens=61", f"optim.lr={args.lr}", "schedule.warmup_steps=0",
        "trainer.save_interval=1000000", f"rl.compile_decode={str(not args.eager_decode).lower()}",
    ])
    train(cfg, Path(cfg.run_dir), source_factory=RLSource)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]
    seconds = sum(r["time/step_s"] for r in rows[1:])
    return [r["reward/plain"] for r in rows], (len(rows) - 1) * args.problems * args.group / seconds


def run_trl(policy: Path, args, tmp: Path) -> tuple[list[float], float]:
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(policy)
    model = transformers.AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    source = prompt_source("nano_chain_sum", 0)
    # Our step s uses problems s * P .. s * P + P - 1 (one rank, no refills): the same problems, in order.
    rows = [{"prompt": tokenizer.bos_token + source[i][0], "answer": source[i][1]}
            for i in range(args.steps * args.problems)]
    verifier = nano_verifier()

    def exact_answer(completions, answer, **kwargs):
        return [verifier.score(c, a) for c, a in zip(completions, answer)]

    step_ends: list[float] = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            step_ends.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(dir=tmp), per_device_train_batch_size=args.problems * args.group,
        num_generations=args.group, max_completion_length=61, temperature=1.0, top_p=1.0, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.98, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=args.steps, num_iterations=1, steps_per_generation=1, beta=0.0, scale_rewards="none",
        loss_type="dapo", logging_steps=1, report_to=[], use_cpu=True, bf16=False, shuffle_dataset=False,
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[StepTimes()])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    seconds = step_ends[-1] - step_ends[0]
    return rewards, (len(step_ends) - 1) * args.problems * args.group / seconds


def measure(side: str, policy: Path, args) -> tuple[list[float], float]:
    """One side's reward curve and RL samples/s, measured in a fresh process."""
    # -P: benchmarks/ off sys.path, where kernels.py would shadow the `kernels` package that TRL's imports load.
    command = [sys.executable, "-P", __file__, "--side", side, "--policy", str(policy), "--problems", str(args.problems),
               "--group", str(args.group), "--steps", str(args.steps), "--lr", str(args.lr)] + (
                   ["--eager-decode"] if args.eager_decode else [])
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} measurement failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["rewards"], result["rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", default=None, help="a run directory, trainer checkpoint or HF directory")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of both sides")
    parser.add_argument("--eager-decode", action="store_true", help="ours without rl.compile_decode")
    parser.add_argument("--side", choices=("TRL", "ours"), help=argparse.SUPPRESS)  # one measurement, in this process
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        with tempfile.TemporaryDirectory() as tmp:
            rewards, rate = (run_trl if args.side == "TRL" else run_ours)(Path(args.policy), args, Path(tmp))
        print(json.dumps({"rewards": rewards, "rate": rate}))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.problems} problems x G {args.group}, "
          f"{args.steps} steps (the first is warm-up), {args.rounds} rounds; ours with "
          f"rl.compile_decode={str(not args.eager_decode).lower()}")
    rewards: dict[str, list[float]] = {}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        policy = hf_policy(args.init_from, Path(tmp) / "policy")
        for round_ in range(args.rounds):
            rates = {}
            for side in (("TRL", "ours") if round_ % 2 == 0 else ("ours", "TRL")):
                rewards[side], rates[side] = measure(side, policy, args)
            ratios.append(rates["ours"] / rates["TRL"])
            print(f"round {round_ + 1}: RL samples/s: ours {rates['ours']:.1f}, TRL {rates['TRL']:.1f}, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print("step  reward (ours)  reward (TRL)")
    for step, (ours, theirs) in enumerate(zip(rewards["ours"], rewards["TRL"]), 1):
        print(f"{step:4d}  {ours:13.3f}  {theirs:12.3f}")
    print(f"ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
