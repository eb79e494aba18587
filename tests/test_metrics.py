"""The metrics sink: metrics.jsonl written and flushed per step, rank 0 only, wandb offline.

pytest tests/test_metrics.py
"""

import json

import pytest
import torch

from zaya_train.metrics import MetricsSink, WandbConfig


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_has_one_flushed_object_per_step_and_appends_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    sink = MetricsSink(run_dir, WandbConfig())
    sink.log(1, torch.tensor(2.5), {"lr": 1e-3, "router/load_entropy_mean": torch.tensor(0.75)})
    sink.log(2, 2.25)
    # Read while the sink is still open: each line is on disk as soon as it is logged.
    lines = read_lines(run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 2.5), (2, 2.25)]
    assert lines[0]["lr"] == 1e-3 and lines[0]["router/load_entropy_mean"] == 0.75
    assert all(isinstance(r["time"], float) for r in lines)
    with pytest.raises(ValueError, match="'step'"):
        sink.log(3, 1.0, {"step": 3})
    sink.close()
    with MetricsSink(run_dir, WandbConfig()) as resumed:
        resumed.log(3, 2.0)
    assert [r["step"] for r in read_lines(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_only_rank_0_writes(tmp_path):
    with MetricsSink(tmp_path, WandbConfig(mode="offline"), rank=1) as sink:
        sink.log(1, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_is_written_under_its_dir(tmp_path, monkeypatch):
    # wandb's own caches, settings and debug logs default to the home directory; keep them in tmp_path too.
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "XDG_CACHE_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    wandb_dir = tmp_path / "wandb_files"
    config = WandbConfig(mode="offline", project="zaya-test", name="unit", tags=["ci"], dir=str(wandb_dir))
    with MetricsSink(tmp_path / "run", config, run_config={"optim": {"lr": 1e-3}}) as sink:
        sink.log(1, 3.0, {"lr": 1e-3})
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].rglob("*.wandb"))


def test_bad_wandb_mode_names_the_key():
    with pytest.raises(ValueError, match="WandbConfig.mode"):
        WandbConfig(mode="cloud")
