"""Where an RL step's time goes: generation, reward, training, weight sync (`recipe=rl` through the trainer, CPU).

    python benchmarks/rl_step.py                                  # nano preset, random policy, plain RL
    python benchmarks/rl_step.py --preset small --steps 3
    python benchmarks/rl_step.py --init-from runs/nano/base --codesign   # a trained policy, co-design rollouts

Runs `--steps` + 1 RL steps (the first is warm-up and not counted) of the `rl=nano` settings (32 problems x G 8,
61 new tokens) and reads the per-step timings the loop logs. Then, on the final weights, a bare
`RolloutEngine.generate` over the same problems, group size and budget as a step's plain round gives the
engine's own tokens/s: `generation_ratio` = loop generation tokens/s / bare engine tokens/s (1.0: the loop adds
no hidden cost to generation). `sync_share` is weight sync's share of the step. The last line is
`ratio=<generation_ratio>`. With --codesign the loop's generation (plain and aggregation rounds) is compared
with the bare engine on plain prompts only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zaya_train.cli import compose_run_config
from zaya_train.data import NANO_CHARS, char_tokenizer
from zaya_train.hf import save_pretrained
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rl.loop import RLSource
from zaya_train.rl.prompts import prompt_source
from zaya_train.rollout import RolloutEngine
from zaya_train.train.trainer import train


def random_policy(name: str, path: Path) -> Path:
    tokenizer = char_tokenizer(NANO_CHARS)
    config = preset(name, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    save_pretrained(ZayaForCausalLM(config), path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano", choices=["nano", "small"])
    parser.add_argument("--init-from", default=None, help="a trained policy (default: a random one of --preset)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--codesign", action="store_true", help="rl.codesign.share=0.5 rl.codesign.rounds=2")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(args.init_from) if args.init_from else random_policy(args.preset, Path(tmp) / "policy")
        overrides = [f"model.init_from={policy}", f"run_dir={tmp}/run", f"trainer.max_steps={args.steps + 1}",
                     "trainer.progress_bar=false", "wandb.mode=disabled", "rl.max_new_tokens=61",
                     "trainer.save_interval=1000000"]
        if args.codesign:
            overrides += ["rl.codesign.share=0.5", "rl.codesign.rounds=2"]
        cfg = compose_run_config("rl", overrides)
        final = {}
        train(cfg, Path(cfg.run_dir), on_finish=lambda engine: final.update(model=engine.module),
              source_factory=RLSource)
        rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "event" not in r]
        decoded = statistics.median(
            b["compute/decode_tokens"] - a["compute/decode_tokens"] for a, b in itertools.pairwise(rows))
        rows = rows[1:]

        def per_step(key: str) -> float:
            return statistics.median(r[key] for r in rows)

        trained = statistics.median(r["samples/trained"] for r in rows)
        parts = {name: per_step(f"time/{name}_s") for name in ("generate", "reward", "train", "sync")}
        step_s = sum(parts.values())
        print(f"RL step ({args.preset}, {cfg.rl.prompts_per_step} problems x G {cfg.rl.group_size}"
              f"{', co-design 50/25/25' if args.codesign else ''}), median over {len(rows)} steps:")
        for name, seconds in parts.items():
            print(f"  {name:9s} {seconds:8.3f} s  {100 * seconds / step_s:5.1f}%")
        loop_tok_s = decoded / parts["generate"]
        print(f"  generation {loop_tok_s:,.0f} new tokens/s; training {trained / parts['train']:,.1f} samples/s")

        tokenizer = char_tokenizer(NANO_CHARS)
        source = prompt_source(cfg.rl.data, cfg.seed)
        prompts = [[tokenizer.bos_token_id, *tokenizer(source[i][0], add_special_tokens=False)["input_ids"]]
                   for i in range(cfg.rl.prompts_per_step) for _ in range(cfg.rl.group_size)]
        batch = len(prompts)
        engine = RolloutEngine(final["model"])
        timings, tokens = [], 0
        for repeat in range(3):
            start = time.perf_counter()
            results = engine.generate(prompts, max_new_tokens=cfg.rl.max_new_tokens, seed=repeat,
                                      max_batch_size=batch)
            timings.append(time.perf_counter() - start)
            tokens = sum(len(r.token_ids) for r in results)
        bare_tok_s = tokens / statistics.median(timings)
        print(f"  bare engine.generate, batch {batch}: {bare_tok_s:,.0f} new tokens/s")
        print(f"sync_share={parts['sync'] / step_s:.4f}")
        print(f"ratio={loop_tok_s / bare_tok_s:.3f}")


if __name__ == "__main__":
    main()
