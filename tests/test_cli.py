"""The `zaya-train` command: bad configs fail fast naming the key; sweeps; export to transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from zaya_train.cli import _register_schema, check_config
from zaya_train.hf import load_pretrained
from zaya_train.rollout import RolloutEngine
from zaya_train.train.config import ConfigError

FAST = ["trainer.progress_bar=false", "wandb.mode=disabled", "schedule.warmup_steps=1", "data.micro_batch_size=8"]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "zaya_train", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize(
    ("recipe", "overrides", "key"),
    [
        ("nano_pretrain", ["trainer.max_stepz=3"], "trainer.max_stepz"),
        ("nano_pretrain", ["trainer.max_steps=many"], "trainer.max_steps"),
        ("nano_pretrain", ["deepspeed.zero_stage=7"], "deepspeed.zero_stage"),
        ("nano_pretrain", ["trainer.max_steps=-1"], "trainer.max_steps"),
        ("nano_pretrain", ["optim.lr=-1"], "optim.lr"),
        ("nano_pretrain", ["model=huge"], "model"),
        ("pretrain", [], "data.path"),
        ("pretrain", ["data.path=/nonexistent/corpus.jsonl"], "data.path"),
        ("export", ["out=/tmp/x"], "checkpoint"),
    ],
)
def test_bad_config_names_the_key(recipe, overrides, key):
    _register_schema()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(recipe, overrides)


def test_cli_fails_fast_with_one_line(tmp_path):
    proc = cli("deepspeed.zero_stage=7", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["zaya-train: error: deepspeed.zero_stage: must be 0, 1, 2 or 3, got 7"]
    assert not (tmp_path / "run").exists(), "nothing runs, nothing is written"
    unknown = cli("recipe=nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "recipe" in unknown.stderr


def test_paths_that_hold_no_checkpoint_fail_fast_naming_the_key(tmp_path):
    """A directory without a checkpoint given as trainer.resume, model.init_from or an evaluation checkpoint: one
    line naming the key, exit code 2, nothing run."""
    empty = tmp_path / "empty_run"
    (empty / "checkpoints" / ".tmp-step_00000010").mkdir(parents=True)  # an interrupted write is not a checkpoint
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "weights.bin").write_bytes(b"")
    cases = [
        ([f"trainer.resume={empty}"], "trainer.resume"),
        ([f"model.init_from={stray}"], "model.init_from"),
        ([f"model.init_from={tmp_path / 'missing'}"], "model.init_from"),
        (["recipe=eval_rsa", f"checkpoint={empty}"], "checkpoint"),
    ]
    for overrides, key in cases:
        proc = cli("recipe=nano_pretrain", *overrides, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (overrides, proc.stderr[-2000:])
        assert lines[0].startswith(f"zaya-train: error: {key}: "), lines[0]
    assert not (tmp_path / "run").exists()


def test_sweep_runs_one_job_per_value(tmp_path):
    proc = cli("-m", "recipe=nano_pretrain", "trainer.max_steps=2,3", "trainer.save_interval=10", *FAST, f"run_dir={tmp_path / 'sweep'}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, steps in (("0", 2), ("1", 3)):
        rows = [json.loads(line) for line in (tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == steps


def test_train_then_export_loads_in_transformers(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    trained = cli("recipe=nano_pretrain", "trainer.max_steps=3", "trainer.save_interval=3", *FAST, f"run_dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = cli("recipe=export", f"checkpoint={run_dir}", f"out={out}", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer("Q12+34=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    biases = [r.balancing_biases[:-1] for r in ours.routers()]
    assert any(bool((b != 0).any()) for b in biases), "trained balancing biases travel with the export"
    # The rollout engine reads the run directory itself (its latest trainer checkpoint) to the same weights.
    engine = RolloutEngine.from_pretrained(run_dir)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name


def _report_run_dir(rank: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    import torch.distributed as dist

    from zaya_train.cli import _rank0_run_dir

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    # Each rank resolved the default run_dir at its own second.
    chosen = _rank0_run_dir(Path(f"runs/nano_pretrain/20261203-20000{rank}"))
    Path(out_dir, f"rank{rank}").write_text(str(chosen))
    dist.destroy_process_group()


def test_every_rank_writes_to_rank_0s_run_dir(tmp_path):
    from zaya_train.train.engine import _free_port

    torch.multiprocessing.spawn(_report_run_dir, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert {(tmp_path / f"rank{r}").read_text() for r in (0, 1)} == {"runs/nano_pretrain/20261203-200000"}
