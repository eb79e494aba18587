"""FLOPs per token on the nano config by hand, peak FLOP/s and MFU.

pytest tests/train/test_metrics.py
"""

import pytest
import torch

from zaya_train.model import preset
from zaya_train.train.metrics import model_flops_per_token, peak_flops, throughput


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
