"""The nano recipe learns as fast as a plain PyTorch loop: the trainer's first steps equal a hand-written loop's on
the same weights and batches (every parameter and balancing bias), and a full default run (slow) reaches the loss
and held-out accuracy that the same task reaches in a plain loop."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zaya_train.cli import compose_run_config
from zaya_train.data import (
    NANO_CHARS,
    ChainSumConfig,
    ChainSumDataset,
    LoaderConfig,
    PackedLoader,
    char_tokenizer,
)
from zaya_train.model import ZayaForCausalLM
from zaya_train.train.balancer import ExpertBiasBalancer

DRIVER = Path(__file__).with_name("run_driver.py")
STEPS = 4
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.save_interval=1000", "trainer.eval_problems=0",
             "trainer.progress_bar=false", "trainer.log_interval=1", "wandb.mode=disabled", "data.micro_batch_size=16",
             "schedule.warmup_steps=2", "schedule.total_steps=10"]


def cosine_lr(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from the peak down to floor * peak at `total` (by hand)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_trainer_steps_equal_a_plain_loop(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(DRIVER.parents[2]),
           "ZAYA_TEST_DUMP_INITIAL": str(tmp_path / "initial.pt"), "ZAYA_TEST_DUMP_WEIGHTS": str(tmp_path / "final.pt")}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "result.json"), *OVERRIDES, f"run_dir={run_dir}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = compose_run_config("nano_pretrain", OVERRIDES + [f"run_dir={run_dir}"])
    tokenizer = char_tokenizer(NANO_CHARS)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    model = ZayaForCausalLM(cfg.model.build(tokenizer_size=len(tokenizer), special_ids=special))
    assert model.config.vocab_size == len(tokenizer) == 20, "the char vocabulary is never padded"
    model.load_state_dict(torch.load(tmp_path / "initial.pt"))
    model.train()
    # The plain loop: torch AdamW with weight decay on matrices only, clipping at 1.0, a hand-written schedule.
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
    )
    balancer = ExpertBiasBalancer(model.routers(), cfg.balancer)
    windows = ChainSumDataset(ChainSumConfig(), tokenizer, size=cfg.data.num_samples, seed=cfg.seed)
    batches = iter(PackedLoader(windows, LoaderConfig(micro_batch_size=cfg.data.micro_batch_size, seed=cfg.seed)))
    losses = []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.optim.lr, 2, 10, cfg.schedule.min_lr_ratio)
        batch = next(batches)
        out = model(batch["input_ids"], document_ids=batch["document_ids"], labels=batch["labels"],
                    return_logits=False)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.deepspeed.gradient_clipping)
        optimizer.step()
        balancer.accumulate(out.tokens_per_expert)
        balancer.step()
        losses.append(out.loss.item())

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "event" not in r] == pytest.approx(losses, abs=1e-6)
    trained = torch.load(tmp_path / "final.pt")
    state = model.state_dict()
    for name, value in trained.items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_default_nano_run_learns_the_task(nano_base_run):
    """`zaya-train recipe=nano_pretrain` as a user runs it (seed 0, 500 steps: the main job's first pretraining run). Before the vocabulary fix this run ended at loss 0.23-0.46
    and 1-1.5% greedy accuracy; now seed 0 ends at ~0.03 and ~0.59. The loss of this task falls in a late, sharp
    drop whose step varies from seed to seed (benchmarks/README.md has the 3-seed figures), so the bounds guard
    against the old failure with margin rather than pin this seed's numbers."""
    rows = [json.loads(line) for line in (nano_base_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "event" not in r][-1]
    evaluation = next(r for r in rows if r.get("event") == "eval")
    assert final["step"] == 500
    assert final["loss"] <= 0.1, final["loss"]
    assert evaluation["eval/greedy_accuracy"] >= 0.4, evaluation
