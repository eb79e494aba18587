"""Config validation, presets and parameter accounting."""

import os

import psutil
import pytest

from zaya_train.model import ZayaConfig, parameter_counts, preset


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
        (dict(num_experts_per_tok=2), "num_experts_per_tok"),
        (dict(layer_types=["hybrid_sliding"] * 4), "sliding_window"),
        (dict(layer_types=["hybrid"] * 3), "layer_types"),
        (dict(layer_types=["hybrid", "full", "hybrid", "hybrid"]), "layer_types"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_key_value_heads=1, head_dim=3, num_attention_heads=1), "head_dim"),
        (dict(eos_token_id=64), "eos_token_id"),
        (dict(rope_parameters={"hybrid": {"rope_type": "yarn", "rope_theta": 1e4}}), "rope_type"),
        (dict(rope_parameters={"hybrid": {"rope_theta": 1e4, "partial_rotary_factor": 0.3}}), "partial_rotary_factor"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("nano", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(ValueError, match="hiden_size"):
        preset("nano", hiden_size=3)


def zaya1_block_params(D=2048, Q=8, G=2, d=128, E=16, F=2048, R=256, t0=2, t1=2) -> tuple[int, int]:
    """Per-block (total, expert) parameter counts from the ZAYA1-8B report's shapes (arXiv 2605.05365)."""
    q, kv = Q * d, G * d
    conv = q + kv
    cca = D * q + D * kv + 2 * D * (kv // 2) + conv * t0 + conv + conv * d * t1 + conv + q * D + G
    router = D * R + R + R + R + 2 * (R * R + R) + R * (E + 1)
    norms_and_scales = 2 * D + 8 * D
    expert = 3 * D * F
    return cca + router + norms_and_scales + E * expert, expert


def test_zaya1_8b_counts_by_hand():
    config = preset("zaya1_8b")
    block, expert = zaya1_block_params()
    embedding = 262272 * 2048
    # the first router has no EDA scale; final norm and input scale/bias
    non_embedding = 40 * block - 256 + 2048 + 2 * 2048
    counts = parameter_counts(config)
    assert counts["embedding"] == embedding
    assert counts["total_non_embedding"] == non_embedding
    assert counts["total"] == non_embedding + embedding
    assert counts["active"] == non_embedding - 40 * 15 * expert
    assert round(counts["total_non_embedding"] / 1e9, 2) == 8.30
    assert round(counts["active"] / 1e9, 3) == 0.754
    assert round(counts["total"] / 1e9, 2) == 8.84


def test_counting_allocates_no_weights():
    rss_before = psutil.Process(os.getpid()).memory_info().rss
    parameter_counts(preset("zaya1_8b"))
    grown = psutil.Process(os.getpid()).memory_info().rss - rss_before
    assert grown < 1 << 30, f"counting grew RSS by {grown / 2**30:.1f} GiB; 8.8B fp32 weights would be 33 GiB"


def test_presets_sizes():
    small = parameter_counts(preset("small"))["total"]
    nano = parameter_counts(preset("nano"))["total"]
    assert 80e6 < small < 130e6
    assert 1e6 < nano < 5e6


def test_hf_dict_round_trip():
    config = preset("small", layer_types=["hybrid", "hybrid_sliding"] * 3 + ["hybrid"], sliding_window=128)
    assert ZayaConfig.from_hf_dict(config.to_hf_dict()) == config
