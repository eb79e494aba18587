"""recipe=plan (zaya_train/plan.py): parameter counts, FLOPs, memory per ZeRO stage, micro-batch sizing, warnings.

    pytest tests/test_plan.py

The expected numbers are worked out by hand in the tests (written out term by term), not read back from the code.
"""

import json

import pytest
import torch

from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.model import parameter_counts as meta_parameter_counts
from zaya_train.plan import (
    GIB,
    PlanConfig,
    activation_bytes,
    build_plan,
    checkpointed_layer_bytes_per_token,
    flops_per_token,
    format_table,
    layer_activation_bytes_per_token,
    layer_activation_constant_bytes,
    max_micro_batch,
    memory_per_gpu,
    parameter_counts,
    run_plan,
    sizing_warnings,
    usable_bytes,
)
from zaya_train.train.metrics import model_flops_per_token
from zaya_train.train.optim import parameter_kinds

# ZAYA1-8B (the zaya1_8b preset = HF defaults), by hand. D=2048, L=40, h_q=8, h_k=2, d=128 -> Q=1024, K=256,
# C=Q+K=1280; E=16, F=2048, R=256, V=262272, cca_time0=cca_time1=2.
#   CCA     D(Q+2K) = 2048*1536 = 3,145,728; o_proj Q*D = 2,097,152; depthwise conv C*2 + C = 3,840;
#           grouped conv C*d*2 + C = 328,960; temp h_k = 2                       -> 5,575,682
#   norms   2D = 4,096; residual scalings 2 x 4D = 16,384
#   router  down D*R + R = 524,544; EDA scale R = 256 (not layer 0); norm R = 256; fc1, fc2 2(R^2 + R) = 131,584;
#           out_proj R(E+1) = 4,352                                               -> 660,992 (660,736 in layer 0)
#   experts 3*E*F*D = 201,326,592 (one expert 12,582,912)
#   layer   5,575,682 + 4,096 + 16,384 + 660,992 + 201,326,592 = 207,583,746
#   body    40 * 207,583,746 - 256 + 3D (input scale, input bias, final norm) = 8,303,349,840 - 256 + 6,144
#           = 8,303,355,728 (the papers' "8.3B total")
#   tied embedding V*D = 537,133,056 -> total 8,840,488,784 (HF's "8.84B")
#   active  8,303,355,728 - 40 * 15 * 12,582,912 = 753,608,528 (the papers' "760M", our brief's "0.754B")
ZAYA1_8B_TOTAL = 8_840_488_784
ZAYA1_8B_ACTIVE = 753_608_528
ZAYA1_8B_EMBEDDING = 537_133_056
# Muon's matrices per layer: CCA projections 3,145,728 + 2,097,152 = 5,242,880; router D*R + 2R^2 + R(E+1)
# = 524,288 + 131,072 + 4,352 = 659,712; experts 201,326,592 -> 207,229,184; x 40 layers = 8,289,167,360.
ZAYA1_8B_MUON = 8_289_167_360


def test_zaya1_8b_parameters_match_the_hand_count():
    counts = parameter_counts(preset("zaya1_8b"))
    assert counts["total"] == ZAYA1_8B_TOTAL
    assert counts["active"] == ZAYA1_8B_ACTIVE
    assert counts["embedding"] == ZAYA1_8B_EMBEDDING
    assert counts["total_non_embedding"] == 8_303_355_728
    assert counts["muon"] == ZAYA1_8B_MUON
    assert round(counts["total"] / 1e9, 2) == 8.84 and round(counts["active"] / 1e9, 3) == 0.754
    # The model package's own count (built on the meta device) agrees, key by key.
    meta = meta_parameter_counts(preset("zaya1_8b"))
    assert {k: counts[k] for k in meta} == meta


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("small", {}),
        ("nano", {}),
        ("nano", {"tie_word_embeddings": False, "lm_head_bias": True, "attention_bias": True}),
        ("nano", {"layer_types": ["hybrid", "hybrid_sliding"] * 2, "sliding_window": 16, "cca_time0": 3}),
    ],
)
def test_analytic_count_equals_numel_of_an_instantiated_model(name, overrides):
    config = preset(name, **overrides)
    with torch.device("cpu"):
        model = ZayaForCausalLM(config)
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights are listed once
    kinds = parameter_kinds(model)
    params = dict(model.named_parameters())
    assert counts["muon"] == sum(params[n].numel() for n, kind in kinds.items() if kind in ("matrix", "expert"))
    assert counts["active"] == meta_parameter_counts(config)["active"]


def test_memory_per_gpu_zero1_and_zero3_on_8_mi300x_by_hand():
    """AdamW, bf16 weights and gradients, fp32 master + two fp32 moments (12 B/param), P = 8,840,488,784 params
    over N = 8 GPUs (P / 8 = 1,105,061,098 exactly)."""
    config = preset("zaya1_8b")
    counts = parameter_counts(config)
    plan = build_plan(config, PlanConfig(cluster="mi300x", nodes=1, optimizer="adamw", zero_stage=1, seq_len=4096))
    mem = plan["memory_per_gpu_bytes"]
    assert set(mem) == {"0", "1", "2", "3"}
    # ZeRO-1: weights 2P, gradients 2P replicated; optimizer 12P / 8.
    assert mem["1"]["weights"] == 17_680_977_568
    assert mem["1"]["gradients"] == 17_680_977_568
    assert mem["1"]["optimizer"] == 13_260_733_176
    # ZeRO-3: everything divided by 8: 2P/8, 2P/8, 12P/8.
    assert mem["3"]["weights"] == 2_210_122_196
    assert mem["3"]["gradients"] == 2_210_122_196
    assert mem["3"]["optimizer"] == 13_260_733_176
    # ZeRO-0 replicates all 16 B/param; ZeRO-2 divides the gradients too.
    assert mem["0"]["optimizer"] == 106_085_865_408
    assert mem["2"]["gradients"] == 2_210_122_196 and mem["2"]["weights"] == 17_680_977_568
    for row in mem.values():
        assert row["total"] == row["weights"] + row["gradients"] + row["optimizer"] + row["activations"]
        assert row["activations"] == activation_bytes(config, 4096, plan["micro_batch_size"], False)
    # Muon at ZeRO-0: 8 B/param (fp32 master + momentum) for its 8,289,167,360 matrix parameters, 12 B/param for
    # the other 551,321,424 (embedding, convs, vectors): 66,313,338,880 + 6,615,857,088.
    muon0 = memory_per_gpu(config, counts, 0, 8, "muon", "bf16", 4096, 1, False)
    assert muon0["optimizer"] == 72_929_195_968


def test_flops_per_token_is_the_trainers_accounting():
    """6 * (active + V*D) + 12 * Q * ctx per layer; for ZAYA1-8B at 4096: 6 * (753,608,528 + 537,133,056)
    + 40 * 12 * 1024 * 4096 = 7,744,449,504 + 2,013,265,920."""
    config = preset("zaya1_8b")
    assert flops_per_token(config, 4096)["total"] == 7_744_449_504 + 2_013_265_920
    sliding = preset("nano", layer_types=["hybrid", "hybrid_sliding"] * 2, sliding_window=16)
    for cfg, seq in ((config, 4096), (sliding, 64)):
        assert flops_per_token(cfg, seq)["total"] == pytest.approx(model_flops_per_token(cfg, seq), rel=1e-12)


def test_throughput_at_a_stated_mfu_by_hand():
    config = preset("zaya1_8b")
    plan = build_plan(config, PlanConfig(cluster="mi300x", nodes=2, mfu=0.35, seq_len=4096))
    flops = 7_744_449_504 + 2_013_265_920
    tokens_per_s = 0.35 * 1307.4e12 * 16 / flops  # about 750K tokens/s on 16 MI300X
    assert plan["throughput"]["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert plan["throughput"]["days_per_trillion_tokens"] == pytest.approx(1e12 / tokens_per_s / 86400)


def _saved_bytes(config, batch, seq_len, checkpointing):
    """Bytes of the distinct non-parameter storages autograd saves in one bf16 training forward."""
    model = ZayaForCausalLM(config).to(torch.bfloat16).train()
    model.model.gradient_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(3, config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, return_logits=False)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["nano", "small"])
def test_activation_formula_matches_what_autograd_saves(name):
    """Per layer: what a 2-layer model saves minus what a 1-layer one does, per token."""
    batch, seq_len = 1, 64
    tokens = batch * seq_len
    measured = {}
    # The vocabulary only changes what is saved outside the layers; a small one keeps the test quick.
    for ckpt in (False, True):
        one, two = (
            _saved_bytes(preset(name, num_hidden_layers=n, vocab_size=64), batch, seq_len, ckpt) for n in (1, 2)
        )
        measured[ckpt] = two - one
    config = preset(name)
    # The causal conv's input carries cca_time0 + cca_time1 - 2 = 2 zero columns per row: a * C * 2 / seq_len.
    pad = 2 * (config.query_dim + config.kv_dim) * 2 / seq_len
    expected = layer_activation_bytes_per_token(config) * tokens + layer_activation_constant_bytes(config) + pad * tokens
    assert measured[False] == pytest.approx(expected, rel=0.01)
    assert measured[True] == checkpointed_layer_bytes_per_token(config) * tokens


def test_zaya1_8b_activation_bytes_by_hand():
    """bf16: CCA 8D + 10Q + 14K + 16h_q + 12h_k + 4 = 16,384 + 10,240 + 3,584 + 128 + 24 + 4 = 30,364;
    MoE 14D + 8F + 12R + 4E + 31 = 28,672 + 16,384 + 3,072 + 64 + 31 = 48,223. Checkpointed: 4D + 2R = 8,704."""
    config = preset("zaya1_8b")
    assert layer_activation_bytes_per_token(config) == 30_364 + 48_223
    assert checkpointed_layer_bytes_per_token(config) == 8_704


def test_largest_micro_batch_fits_and_is_monotone_in_memory():
    config = preset("zaya1_8b")
    counts = parameter_counts(config)
    previous = -1
    for gib in range(40, 400, 20):
        budget = usable_bytes(gib * GIB, 0.1)
        for ckpt in (False, True):
            n = max_micro_batch(config, counts, 1, 8, "adamw", "bf16", 4096, ckpt, budget)
            fits = memory_per_gpu(config, counts, 1, 8, "adamw", "bf16", 4096, n, ckpt)["total"] <= budget
            over = memory_per_gpu(config, counts, 1, 8, "adamw", "bf16", 4096, n + 1, ckpt)["total"] > budget
            assert over and (fits or n == 0)
        n = max_micro_batch(config, counts, 1, 8, "adamw", "bf16", 4096, False, budget)
        assert n >= previous
        previous = n
    assert previous > 0
    # More memory never fits fewer sequences at any stage, and checkpointing always fits at least as many.
    plans = [build_plan(config, PlanConfig(gpu_memory_gib=g, micro_batch_size=1)) for g in (96, 192, 288)]
    for stage in "0123":
        sizes = [p["memory_grid"]["adamw"]["no_checkpointing"][stage]["max_micro_batch"] for p in plans]
        assert sizes == sorted(sizes)
        for p in plans:
            grid = p["memory_grid"]["adamw"]
            assert grid["checkpointing"][stage]["max_micro_batch"] >= grid["no_checkpointing"][stage]["max_micro_batch"]


def test_sizing_warnings_fire_for_a_config_that_breaks_the_rules():
    assert sizing_warnings(preset("zaya1_8b"), micro_batch_size=4, seq_len=4096) == []
    bad = preset("zaya1_8b", head_dim=96, hidden_size=2000, moe_intermediate_size=1500)
    text = "\n".join(sizing_warnings(bad, micro_batch_size=4, seq_len=4096, expert_parallel=3))
    assert "head_dim=96" in text
    assert "hidden_size=2000" in text
    assert "moe_intermediate_size=1500" in text
    assert "expert_parallel=3" in text
    # Top-1 over 16 experts at micro-batch 1 x 1024: 64 tokens per expert, below the 256 the rule asks for.
    starved = sizing_warnings(preset("zaya1_8b"), micro_batch_size=1, seq_len=1024)
    assert len(starved) == 1 and "~64 tokens" in starved[0]
    plan = build_plan(bad, PlanConfig(micro_batch_size=1))
    assert any("head_dim=96" in w for w in plan["warnings"])


def test_global_batch_sets_the_micro_batch_and_accumulation():
    """ZAYA1's pretraining batch, 4096 x 4096 tokens on 128 nodes x 8 MI300X: 4 sequences per GPU per step."""
    plan = build_plan(preset("zaya1_8b"), PlanConfig(nodes=128, global_batch_tokens=4096 * 4096, seq_len=4096))
    assert plan["micro_batch_size"] == 4 and plan["gradient_accumulation_steps"] == 1
    plan = build_plan(preset("zaya1_8b"), PlanConfig(nodes=1, global_batch_tokens=4096 * 4096, micro_batch_size=8))
    assert plan["gradient_accumulation_steps"] == 64  # 16,777,216 / (8 * 4096 * 8)
    assert not any("not a multiple" in w for w in plan["warnings"])


@pytest.mark.parametrize(
    "key, value",
    [("cluster", "tpu"), ("mfu", 0.0), ("zero_stage", 4), ("optimizer", "sgd"), ("nodes", 0), ("precision", "fp8")],
)
def test_plan_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"plan.{key}"):
        PlanConfig(**{key: value})


def test_run_plan_writes_plan_json_and_prints_a_table(tmp_path, capsys):
    plan = run_plan(preset("small"), PlanConfig(cluster="h100", seq_len=1024), tmp_path)
    out = capsys.readouterr().out
    assert out.strip() == format_table(plan)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["total_parameters"] == parameter_counts(preset("small"))["total"]
    for key in ("active_parameters", "flops_per_token", "memory_per_gpu_bytes", "throughput", "warnings"):
        assert key in saved
    for stage in "0123":
        assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(saved["memory_per_gpu_bytes"][stage])
    assert "NVIDIA H100" in out and "ZeRO" in out


def test_recipe_plan_writes_plan_json_and_names_a_bad_cluster(tmp_path):
    import subprocess
    import sys

    def zaya_train(*args):
        return subprocess.run([sys.executable, "-m", "zaya_train", "recipe=plan", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=False)

    ok = zaya_train("model=zaya1_8b", "cluster=mi300x", "nodes=2", f"run_dir={tmp_path / 'plan'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["total_parameters"] == 8_840_488_784 and sorted(plan["memory_per_gpu_bytes"]) == ["0", "1", "2", "3"]
    bad = zaya_train("cluster=tpu", f"run_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "cluster" in bad.stderr and "unknown cluster 'tpu'" in bad.stderr
