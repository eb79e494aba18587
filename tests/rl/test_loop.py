"""`recipe=rl` end to end through the trainer (run_driver.py, as `zaya-train recipe=rl` runs it): per-step metrics
that reconcile, router replay matching the engine (its decode step eager and compiled), weight sync after updates
(ZeRO-0 and 2-rank ZeRO-3), SIGTERM and resume giving bitwise the same steps, 2-rank ZeRO-1 ranks agreeing, bad
`rl.*` values refused at start.

The policy is a random nano model; the reward is the share of a chosen digit in the completion
(ZAYA_TEST_REWARD_DIGIT), which a random policy scores non-zero, so every step has advantages and real updates.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zaya_train.cli import compose_run_config
from zaya_train.data import load_tokenizer
from zaya_train.hf import load_pretrained
from zaya_train.loading import consolidated_state_dict, latest_checkpoint
from zaya_train.train.config import ConfigError
from zaya_train.train.export import export_checkpoint

DRIVER = Path(__file__).parents[1] / "train" / "run_driver.py"
SMALL = [
    "recipe=rl", "trainer.progress_bar=false", "wandb.mode=disabled", "trainer.max_steps=4", "rl.prompts_per_step=4",
    "rl.group_size=4", "rl.max_new_tokens=16", "rl.codesign.share=0.5", "rl.codesign.rounds=2",
    "rl.codesign.max_new_tokens=6", "rsa.c=2", "rsa.tau=4", "optim.lr=3e-3", "schedule.warmup_steps=0",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(tmp_path: Path, name: str, policy: Path, *overrides: str, nproc: int = 1, **extra_env: str) -> dict:
    result, run_dir = tmp_path / f"{name}.json", tmp_path / name
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(DRIVER.parents[2]), "ZAYA_TEST_REWARD_DIGIT": "7",
           **extra_env}
    args = [str(DRIVER), str(result), *SMALL, f"model.init_from={policy}", f"run_dir={run_dir}", *overrides]
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(result.read_text())


def step_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


def test_rl_steps_log_reconciled_counts_replay_and_synced_weights(tmp_path, policy):
    summary = run(tmp_path, "rl", policy, "rl.dynamic_sampling=true", "rl.diagnostic_interval=2",
                  ZAYA_TEST_CHECK_SYNC="1")
    assert summary["step"] == 4
    rows = step_rows(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["samples/generated/plain"] == 4 * 4
        assert row["samples/generated/round1"] == row["samples/generated/round2"] == 2 * 4
        for suffix in ("", "/plain", "/round1", "/round2"):
            assert row[f"samples/generated{suffix}"] == row[f"samples/dropped{suffix}"] + row[f"samples/trained{suffix}"]
        assert row["rl/logprob_diff_max"] <= 1e-4
        # The no-replay forward runs on optimizer steps 0, 2, ... (logged as steps 1, 3).
        assert ("rl/logprob_diff_max_noreplay" in row) == (row["step"] % 2 == 1)
        if row["step"] % 2:
            assert math.isfinite(row["rl/logprob_diff_max_noreplay"])
        for key in ("reward/plain", "reward/round1", "reward/round2", "time/generate_s", "time/train_s",
                    "time/reward_s", "time/sync_s", "rl/masked_frac", "solve_rate", "compute/total_tokens"):
            assert key in row, key
        assert row["reward/plain"] > 0
        assert row["rl/optimizer_steps"] == 1
    assert rows[-1]["samples_total/generated"] == sum(r["samples/generated"] for r in rows)
    # After four optimizer updates the engine samples from the updated weights, caches invalidated.
    assert summary["sync_logprob_diff"] <= 1e-4
    assert rows[-1]["grad_norm"] > 0


def test_an_rl_checkpoint_exports_to_hf_with_its_tokenizer(tmp_path, policy):
    run(tmp_path, "rl", policy, "trainer.max_steps=1")
    out = export_checkpoint(tmp_path / "rl", tmp_path / "export")
    exported = load_pretrained(out)
    trained = consolidated_state_dict(latest_checkpoint(tmp_path / "rl"))
    initial = load_pretrained(policy).state_dict()
    for name, value in exported.state_dict().items():
        if name in trained:
            torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    assert any(not torch.equal(trained[n], initial[n]) for n in trained if n in initial), "one RL update moved weights"
    assert load_tokenizer(out).get_vocab() == load_tokenizer(policy).get_vocab()


def test_sigterm_then_resume_repeats_the_uninterrupted_run_bitwise(tmp_path, policy):
    run(tmp_path, "straight", policy)
    stopped = run(tmp_path, "stopped", policy, ZAYA_TEST_SIGTERM_AT_STEP="2")
    assert stopped["step"] == 2 and stopped["reason"] == "signal SIGTERM"
    run(tmp_path, "stopped", policy)
    keys = ("step", "loss", "reward/plain", "reward/round1", "reward/round2", "rl/logprob_diff_max", "grad_norm",
            "compute/total_tokens")
    want = [[row[k] for k in keys] for row in step_rows(tmp_path / "straight")]
    got = [[row[k] for k in keys] for row in step_rows(tmp_path / "stopped")]
    assert got == want  # exact: fp32 on the CPU is deterministic, and problems and seeds follow the step


def test_a_step_without_a_kept_group_takes_no_optimizer_step(tmp_path, policy):
    # The nano task's real reward: a random policy solves nothing, dynamic sampling drops every group, even after a
    # refill. A zero-gradient AdamW step would still move the weights; no step is taken.
    run(tmp_path, "nothing", policy, "rl.dynamic_sampling=true", "rl.max_refills=1",
        "deepspeed.gradient_accumulation_steps=3", "trainer.max_steps=2", ZAYA_TEST_REWARD_DIGIT="")
    rows = step_rows(tmp_path / "nothing")
    assert [r["samples/trained"] for r in rows] == [0, 0]
    assert [r["rl/optimizer_steps"] for r in rows] == [0, 0]
    assert [r["samples/generated/plain"] for r in rows] == [2 * 4 * 4, 2 * 4 * 4]  # the refill doubles the plain round
    trained = consolidated_state_dict(latest_checkpoint(tmp_path / "nothing"))
    initial = load_pretrained(policy).state_dict()
    assert all(torch.equal(trained[n], initial[n]) for n in trained if n in initial)


def test_a_compute_budget_stops_the_run_with_a_checkpoint(tmp_path, policy):
    summary = run(tmp_path, "budget", policy, "rl.max_compute_tokens=1")
    assert (summary["step"], summary["reason"]) == (1, "compute_budget"), "step 1 starts at 0 tokens, step 2 past 1"
    assert latest_checkpoint(tmp_path / "budget").name == "step_00000001"
    (row,) = step_rows(tmp_path / "budget")
    assert row["compute/total_tokens"] == sum(row[f"compute/{k}_tokens"] for k in ("prefill", "decode", "trained"))


def test_rl_runs_with_muon_at_momentum_zero(tmp_path, policy):
    # rl=zaya1's optimizer: Muon with momentum 0 on matrices, AdamW elsewhere.
    run(tmp_path, "muon", policy, "optim=muon", "optim.muon_momentum=0.0", "trainer.max_steps=2")
    rows = step_rows(tmp_path / "muon")
    assert [r["rl/optimizer_steps"] for r in rows] == [1, 1]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    trained = consolidated_state_dict(latest_checkpoint(tmp_path / "muon"))
    initial = load_pretrained(policy).state_dict()
    assert not torch.equal(trained["model.layers.0.mlp.experts.down_proj"], initial["model.layers.0.mlp.experts.down_proj"])


@pytest.mark.slow  # compiling the decode step takes most of its minute
@pytest.mark.parametrize(("zero_stage", "nproc"), [(0, 1), (3, 2)], ids=["zero0", "zero3_2ranks"])
def test_compiled_decode_samples_what_the_trainer_scores(tmp_path, policy, zero_stage, nproc):
    # Plain and aggregation rounds (prompts of other lengths, rows finishing at EOS) through one compiled step;
    # under ZeRO-3 the engine decodes its own copy, refreshed from the gathered partitions.
    summary = run(tmp_path, "compiled", policy, "rl.compile_decode=true", "trainer.max_steps=2",
                  f"deepspeed.zero_stage={zero_stage}", nproc=nproc, ZAYA_TEST_CHECK_SYNC="1",
                  TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    assert summary["sync_logprob_diff"] <= 1e-4
    rows = step_rows(tmp_path / "compiled")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rl/logprob_diff_max"] <= 1e-4 for r in rows)
    assert all(r["samples/generated/round2"] == 2 * 4 for r in rows)


def test_two_ranks_zero1_agree(tmp_path, policy):
    # Each rank holds 2 problems x G 2 plain rows and 1 x 2 rows of each round: 8 rows for 3 minibatches of 3
    # micro-batches, so one micro-batch holds no row and runs a zero-weight one; dynamic sampling, refills and the
    # length bonus on.
    summary = run(tmp_path, "zero1", policy, "deepspeed.zero_stage=1", "trainer.max_steps=2", "rl.group_size=2",
                  "deepspeed.gradient_accumulation_steps=3", "rl.minibatches=3", "rl.dynamic_sampling=true",
                  "rl.max_refills=1", "rl.length_bonus=true", nproc=2)
    assert summary["step"] == 2
    assert summary["max_params_diff"] == 0.0
    rows = step_rows(tmp_path / "zero1")
    # prompts_per_step counts problems over all ranks: 4 x G 2, and at most one refill of as many
    assert all(8 <= r["samples/generated/plain"] <= 16 for r in rows)
    assert all(r["rl/optimizer_steps"] == 3 for r in rows if r["samples/trained"])
    assert all(r["rl/logprob_diff_max"] <= 1e-4 for r in rows)


def test_zero3_weight_sync_gathers_the_partitions(tmp_path, policy):
    # Rank 1's batches disagree with the engine's routing in one row: only rank 1 has rows for the other routing's
    # forward, and rank 0 must run that (collective) forward too.
    summary = run(tmp_path, "zero3", policy, "deepspeed.zero_stage=3", "trainer.max_steps=2", nproc=2,
                  ZAYA_TEST_CHECK_SYNC="1", ZAYA_TEST_RELABEL_ROUTING_RANK="1")
    assert summary["max_params_diff"] == 0.0
    assert summary["sync_logprob_diff"] <= 1e-4
    for row in step_rows(tmp_path / "zero3"):
        assert row["rl/routing_mismatch_frac"] > 0
        assert row["rl/logprob_diff_max_noreplay"] <= 1e-4 < row["rl/logprob_diff_max"]


@pytest.mark.parametrize(("override", "key"), [
    ("rl.codesign.share=1.5", "rl.codesign.share"),
    ("rl.codesign.share=-0.1", "rl.codesign.share"),
    ("rl.codesign.rounds=-1", "rl.codesign.rounds"),
    ("rl.group_size=1", "rl.group_size"),
    ("rl.codesign.round_weights=[0.2,0.8]", "rl.codesign.round_weights"),
    ("rl.advantage=ppo", "rl.advantage"),
    ("rl.data=/no/such.jsonl", "rl.data"),
])
def test_bad_rl_values_fail_at_start_naming_the_key(policy, override, key):
    with pytest.raises(ConfigError) as err:
        compose_run_config("rl", [f"model.init_from={policy}", override])
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_rl_needs_a_policy_to_start_from():
    with pytest.raises(ConfigError, match=r"^model\.init_from:"):
        compose_run_config("rl", [])


def test_cli_refuses_a_bad_share_in_one_line(policy, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "zaya_train", "recipe=rl", f"model.init_from={policy}",
                           "rl.codesign.share=2"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("zaya-train: error: rl.codesign.share:")
