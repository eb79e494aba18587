"""The metrics sink (metrics.jsonl, wandb offline), FLOPs per token on the nano config by hand, peak FLOP/s and MFU.

pytest tests/train/test_metrics.py
"""

import json

import pytest
import torch

from zaya_train.model import preset
from zaya_train.train.metrics import (
    MetricsConfig,
    MetricsSink,
    WandbConfig,
    model_flops_per_token,
    peak_flops,
    throughput,
)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_has_one_flushed_object_per_step_and_appends_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    sink = MetricsSink(run_dir, MetricsConfig())
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
    with MetricsSink(run_dir, MetricsConfig()) as resumed:
        resumed.log(3, 2.0)
    assert [r["step"] for r in read_lines(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_only_rank_0_writes(tmp_path):
    with MetricsSink(tmp_path, MetricsConfig(wandb=WandbConfig(mode="offline")), rank=1) as sink:
        sink.log(1, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_is_written_under_its_dir(tmp_path, monkeypatch):
    # wandb's own caches, settings and debug logs default to the home directory; keep them in tmp_path too.
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "XDG_CACHE_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    wandb_dir = tmp_path / "wandb_files"
    config = MetricsConfig(
        wandb=WandbConfig(mode="offline", project="zaya-test", name="unit", tags=["ci"], dir=str(wandb_dir))
    )
    with MetricsSink(tmp_path / "run", config, run_config={"optim": {"lr": 1e-3}}) as sink:
        sink.log(1, 3.0, {"lr": 1e-3})
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].rglob("*.wandb"))


# The nano config (vocab 64, D 128, 4 layers, 4 query heads x 32, 2 KV heads x 32, 4 experts of F 256, router 32):
#   attention per layer: q 128*128 + k 64*128 + v 2 * 32*128 + o 128*128            = 49152
#     convs over 192 channels: depthwise 192*1*2 + 192, grouped 192*32*2 + 192    = 13056
#     temp                                                                           2
#   router per layer: down 32*128 + 32, norm 32, fc1/fc2 2 * (32*32 + 32), out 5*32  = 6432  (+32 EDA scale, layers 1-3)
#   norms 2*128 + residual scaling 2 * 4*128                                         = 1280
#   one expert: 512*128 + 128*256                                                    = 98304
#   top level: final norm 128 + input scale and bias 2*128                           = 384
NANO_ACTIVE = 4 * (49152 + 13056 + 2 + 6432 + 1280 + 98304) + 3 * 32 + 384
LM_HEAD = 64 * 128


def test_flops_per_token_by_hand_on_nano():
    config = preset("nano")
    dense = 6 * (NANO_ACTIVE + LM_HEAD)  # 6 * 681576 = 4089456
    # Attention: 12 * layers * (heads * head_dim) * ctx = 12 * 4 * 128 * 256 = 1572864 at seq_len 256.
    assert model_flops_per_token(config, 256) == dense + 1572864
    # Causal: 12 * 4 * 128 * (256 + 1) / 2 = 789504.
    assert model_flops_per_token(config, 256, causal=True) == dense + 789504
    # Sliding layers count their window: ctx 256, 64, 256, 64 -> 12 * 128 * 640 = 983040.
    sliding = preset("nano", layer_types=["hybrid", "hybrid_sliding"] * 2, sliding_window=64)
    assert model_flops_per_token(sliding, 256) == dense + 983040
    with pytest.raises(ValueError, match="seq_len"):
        model_flops_per_token(config, 0)


def test_peak_flops(monkeypatch):
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override=1e12) == 1e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    assert peak_flops("cuda") == 1307.4e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops("cuda") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops("cuda") is None


def test_throughput_and_mfu():
    # 1e6 tokens in 2 s over 4 devices: 5e5 tokens/s, 1.25e5 per device; at 6e9 FLOPs/token that is 7.5e14 FLOP/s
    # per device, 750 TFLOP/s, and 0.75 of a 1e15 peak.
    out = throughput(1_000_000, 2.0, 6e9, 4, 1e15)
    assert out == pytest.approx(
        {
            "throughput/tokens_per_s": 5e5,
            "throughput/tokens_per_s_per_device": 1.25e5,
            "throughput/tflops_per_device": 750.0,
            "throughput/mfu": 0.75,
        }
    )
    assert "throughput/mfu" not in throughput(1_000_000, 2.0, 6e9, 4, None)


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="WandbConfig.mode"):
        WandbConfig(mode="cloud")
    with pytest.raises(ValueError, match="MetricsConfig.peak_flops"):
        MetricsConfig(peak_flops=0.0)
