"""Trainer overhead: a training step under `zaya-train`'s trainer vs a bare PyTorch loop, same model, data and
optimizer, CPU fp32, one process.

    python benchmarks/trainer_overhead.py                    # nano (its recipe's data) and small (packed text)
    python benchmarks/trainer_overhead.py --regime small --steps 8

The trainer runs through its Python API (`zaya_train.train.trainer.train`: DeepSpeed ZeRO-0 engine, loader,
expert-bias balancer, non-finite guards, metrics every step; checkpoints and the end-of-run evaluation off), its
step time taken from the timestamps in metrics.jsonl. The bare loop builds the same windows, the same model (same
seed) and the same optimizer and schedule, and runs forward, backward, clipping and the optimizer step. Each side
runs in its own subprocess, `--repeats` times alternately, keeping its best median step. MFU is against the faster
of two large fp32 GEMMs timed in the same run (`train_step.peak_gemm_flops`; a CPU has no vendor peak). The last line is `ratio=<bare time / trainer time>`
of the last regime (1.0 means no overhead; the target is >= 0.91, i.e. overhead <= 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_step import peak_gemm_flops  # this script's own folder is on sys.path

REGIMES = {
    "nano": ["recipe=nano", "model=nano"],
    "small": ["recipe=pretrain", "model=small", "model.vocab_size=32768", "data.seq_len=512", "data.micro_batch_size=4",
              "data.bpe_vocab_size=2048", "deepspeed=zero0"],
}
COMMON = ["trainer.log_interval=1", "trainer.save_interval=100000", "trainer.eval_problems=0",
          "trainer.progress_bar=false", "wandb.mode=disabled", "schedule.warmup_steps=1"]


def corpus(path: Path, documents: int = 3000) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    with path.open("w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))}) + "\n")
    return path


def run_config(regime: str, steps: int, run_dir: Path, data_path: Path):
    from zaya_train.cli import compose_run_config

    overrides = list(REGIMES[regime])
    recipe = overrides.pop(0).split("=", 1)[1]
    overrides += COMMON + [f"trainer.max_steps={steps}", f"run_dir={run_dir}"]
    if recipe == "pretrain":
        overrides.append(f"data.path={data_path}")
    return compose_run_config(recipe, overrides)


def bare(cfg, run_dir: Path, steps: int) -> list[float]:
    import torch

    from zaya_train.data import LoaderConfig, PackedLoader
    from zaya_train.model import ZayaForCausalLM
    from zaya_train.train.data import build_training_data
    from zaya_train.train.optim import build_optimizer
    from zaya_train.train.schedule import build_scheduler

    torch.manual_seed(cfg.seed)
    data = build_training_data(cfg.data, run_dir, cfg.seed, rank=0)
    tokenizer = data.tokenizer
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    model = ZayaForCausalLM(cfg.model.build(tokenizer_size=len(tokenizer), special_ids=special)).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    loader = iter(PackedLoader(data.windows, LoaderConfig(micro_batch_size=cfg.data.micro_batch_size, seed=cfg.seed)))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(loader)
        out = model(batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"], return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def trainer(cfg, run_dir: Path) -> list[float]:
    from zaya_train.train.trainer import train

    train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in rows if "event" not in r]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def worker(regime: str, impl: str, steps: int, warmup: int, workdir: Path, data_path: Path) -> dict:
    import torch

    run_dir = workdir / f"{regime}-{impl}"
    cfg = run_config(regime, steps + warmup, run_dir, data_path)
    times = bare(cfg, run_dir, steps + warmup) if impl == "bare" else trainer(cfg, run_dir)
    seq_len = cfg.data.seq_len
    tokens = cfg.data.micro_batch_size * seq_len
    from zaya_train.train.metrics import model_flops_per_token

    vocab = cfg.model.vocab_size or 64
    flops = model_flops_per_token(cfg.model.build(tokenizer_size=vocab, special_ids={}), seq_len) * tokens
    return {"seconds": statistics.median(times[warmup:]), "tokens": tokens, "flops": flops,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=[*REGIMES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: nano 30, small 6)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", nargs=4, metavar=("REGIME", "IMPL", "WORKDIR", "CORPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        regime, impl, workdir, data_path = args.worker
        print(json.dumps(worker(regime, impl, args.steps, args.warmup, Path(workdir), Path(data_path))))
        return

    peak = peak_gemm_flops()
    regimes = list(REGIMES) if args.regime == "all" else [args.regime]
    ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus(workdir / "corpus.jsonl")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
        for regime in regimes:
            steps = args.steps or {"nano": 30, "small": 6}[regime]
            best: dict[str, dict] = {}
            for repeat in range(args.repeats):
                for impl in ("bare", "trainer"):
                    rundir = workdir / f"r{repeat}"
                    rundir.mkdir(exist_ok=True)
                    cmd = [sys.executable, __file__, "--worker", regime, impl, str(rundir),
                           str(workdir / "corpus.jsonl"), "--steps", str(steps), "--warmup", str(args.warmup)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    res = json.loads(out.strip().splitlines()[-1])
                    if impl not in best or res["seconds"] < best[impl]["seconds"]:
                        best[impl] = res
            print(f"\n{regime}: {best['bare']['tokens']} tokens/step, fp32, {steps} timed steps, best of {args.repeats}")
            print(f"{'impl':<9}{'ms/step':>10}{'tokens/s':>11}{'MFU (of GEMM)':>15}")
            for impl, res in best.items():
                mfu = res["flops"] / res["seconds"] / peak
                print(f"{impl:<9}{res['seconds'] * 1e3:>10.1f}{res['tokens'] / res['seconds']:>11.0f}{mfu:>15.1%}")
            ratio = best["bare"]["seconds"] / best["trainer"]["seconds"]
            print(f"{regime}: trainer overhead {1 / ratio - 1:+.1%} (bare/trainer time ratio {ratio:.3f})")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
