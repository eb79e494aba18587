"""Parameter grouping, per-expert Muon, the Muon + AdamW optimizer, and DeepSpeed's Muon (ZeRO 1-3) against torch's.

pytest tests/train/test_optim.py
"""

import copy
import io
import math

import pytest
import torch
from torch import nn

from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.train.optim import ExpertMuon, MuonAdamW, OptimConfig, build_optimizer, group_parameters

# Where each parameter of one nano layer must go under the Muon split (zaya_train/train/optim.py's table).
LAYER_MUON = [
    "self_attn.qkv_proj.q_proj.weight",
    "self_attn.qkv_proj.k_proj.weight",
    "self_attn.qkv_proj.v_proj_current.weight",
    "self_attn.qkv_proj.v_proj_delayed.weight",
    "self_attn.o_proj.weight",
    "mlp.gate.down_proj.weight",
    "mlp.gate.router_mlp.fc1.weight",
    "mlp.gate.router_mlp.fc2.weight",
    "mlp.gate.router_mlp.out_proj.weight",
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
]
LAYER_ADAMW = ["self_attn.qkv_proj.conv_qk_depthwise.weight", "self_attn.qkv_proj.conv_qk_grouped.weight"]
LAYER_NO_DECAY = [
    "self_attn.qkv_proj.conv_qk_depthwise.bias",
    "self_attn.qkv_proj.conv_qk_grouped.bias",
    "self_attn.qk_norm.temp",
    "mlp.gate.down_proj.bias",
    "mlp.gate.router_mlp.norm.weight",
    "mlp.gate.router_mlp.fc1.bias",
    "mlp.gate.router_mlp.fc2.bias",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
] + [
    f"{block}.{name}"
    for block in ("post_attention_residual_scale", "post_mlp_residual_scale")
    for name in ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")
]


def names(groups, group):
    return sorted(name for name, _ in groups[group])


def test_muon_split_puts_each_nano_parameter_in_its_group():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2))
    groups = group_parameters(model, OptimConfig(name="muon"))
    layers = ("model.layers.0.", "model.layers.1.")
    assert names(groups, "muon") == sorted(p + n for p in layers for n in LAYER_MUON)
    # The LM head is tied to the embedding, so it appears once, as the embedding.
    assert names(groups, "adamw") == sorted(
        ["model.embed_tokens.weight"] + [p + n for p in layers for n in LAYER_ADAMW]
    )
    expected_no_decay = [p + n for p in layers for n in LAYER_NO_DECAY] + [
        "model.layers.1.mlp.gate.router_states_scale",  # layer 0 has no EDA scale
        "model.norm.weight",
        "model.input_hidden_states_scale",
        "model.input_hidden_states_bias",
    ]
    assert names(groups, "adamw_no_decay") == sorted(expected_no_decay)


def test_adamw_mode_and_untied_head():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=1, tie_word_embeddings=False))
    groups = group_parameters(model, OptimConfig(name="adamw"))
    assert groups["muon"] == []
    assert "lm_head.weight" in names(groups, "adamw")
    assert "model.layers.0.mlp.experts.gate_up_proj" in names(groups, "adamw")
    assert "model.layers.0.self_attn.o_proj.weight" in names(groups, "adamw")
    assert "model.layers.0.input_layernorm.weight" in names(groups, "adamw_no_decay")


def test_one_step_on_nano_moves_every_parameter_but_not_the_balancing_biases():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=1, moe_intermediate_size=32))
    before = copy.deepcopy(model.state_dict())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    assert isinstance(optimizer, MuonAdamW)
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, param in model.named_parameters():
        assert not torch.equal(after[name], before[name]), name
    assert torch.equal(
        after["model.layers.0.mlp.gate.balancing_biases"], before["model.layers.0.mlp.gate.balancing_biases"]
    )


def test_expert_muon_updates_each_expert_as_torch_muon_updates_a_lone_matrix():
    experts = nn.Parameter(torch.randn(3, 8, 6))
    alone = [nn.Parameter(experts[e].detach().clone()) for e in range(3)]
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"}
    ours, reference = ExpertMuon([experts], **kwargs), torch.optim.Muon(alone, **kwargs)
    for _ in range(3):
        grad = torch.randn(3, 8, 6)
        experts.grad = grad.clone()
        for e in range(3):
            alone[e].grad = grad[e].clone()
        ours.step()
        reference.step()
    for e in range(3):
        assert torch.equal(experts[e], alone[e])


@pytest.mark.parametrize("shape", [(128, 128), (32, 128), (2, 64, 96)])
def test_match_rms_adamw_gives_updates_of_rms_about_0_2_lr(shape):
    # Moonlight: an orthogonalised [A, B] update has RMS 1/sqrt(max(A, B)); times 0.2 * sqrt(max(A, B)) that is
    # 0.2 per unit lr (a bit less, since Newton-Schulz stops short of exact orthogonality). Keller's "original"
    # scaling would give ~1/sqrt(max(A, B)) here, 0.09 to 0.1.
    param = nn.Parameter(torch.zeros(shape))
    param.grad = torch.randn(shape)
    optimizer = build_optimizer(_Toy(param), OptimConfig(name="muon", lr=1.0, weight_decay=0.0))
    optimizer.step()
    rms_per_matrix = param.detach().pow(2).mean(dim=(-2, -1)).sqrt().flatten()
    assert ((rms_per_matrix > 0.15) & (rms_per_matrix < 0.21)).all(), rms_per_matrix


class _Toy(nn.Module):
    """An embedding, a hidden matrix with a bias, and a norm; `matrix` may be replaced by experts."""

    def __init__(self, matrix: nn.Parameter | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        if matrix is not None:
            self.hidden.weight = matrix


def _set_grads(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


def test_muon_adamw_steps_as_torch_muon_plus_torch_adamw():
    toy = _Toy()
    ref = copy.deepcopy(toy)
    config = OptimConfig(lr=1e-2, muon_lr=2e-2, weight_decay=0.1, beta1=0.8, beta2=0.9)
    ours = build_optimizer(toy, config)
    muon = torch.optim.Muon([ref.hidden.weight], lr=2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(
        [
            {"params": [ref.embed.weight], "weight_decay": 0.1},
            {"params": [ref.hidden.bias, ref.norm.weight, ref.norm.bias], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.8, 0.9),
    )
    for seed in range(3):
        _set_grads(toy, seed)
        _set_grads(ref, seed)
        ours.step()
        muon.step()
        adamw.step()
    for (name, a), b in zip(toy.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name


def test_a_scheduler_reaches_both_inner_optimizers():
    toy = _Toy()
    optimizer = build_optimizer(toy, OptimConfig(lr=1e-2, muon_lr=2e-2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    _set_grads(toy, 0)
    optimizer.step()
    scheduler.step()
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert [g["lr"] for g in optimizer.adamw.param_groups] == pytest.approx([5e-3, 5e-3])


def test_state_dict_round_trip_resumes_identically():
    toy = _Toy()
    config = OptimConfig(lr=1e-2)
    optimizer = build_optimizer(toy, config)
    for seed in range(2):
        _set_grads(toy, seed)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_toy = copy.deepcopy(toy)
    resumed = build_optimizer(resumed_toy, config)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _set_grads(toy, 7)
    _set_grads(resumed_toy, 7)
    optimizer.step()
    resumed.step()
    for a, b in zip(toy.parameters(), resumed_toy.parameters()):
        assert torch.equal(a, b)


def test_flattened_parameters_fail_loudly_at_step():
    # What a ZeRO-1/2 wrapper does to a client optimizer: its groups hold one flat partition.
    matrix = nn.Parameter(torch.randn(4, 4))
    optimizer = ExpertMuon([matrix])
    flat = nn.Parameter(torch.randn(16))
    flat.grad = torch.randn(16)
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="flat partitions"):
        optimizer.step()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"name": "sgd"}, "OptimConfig.name"),
        ({"muon_adjust_lr": "x"}, "OptimConfig.muon_adjust_lr"),
        ({"beta2": 1.0}, "OptimConfig.beta2"),
        ({"lr": -1.0}, "OptimConfig.lr"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's own Muon (ZeRO 1-3) against torch.optim.Muon (stage 0): the per-shape lr of `deepspeed_muon`


class _TwoMatrices(nn.Module):
    """One tall [48, 16] and one wide [16, 48] hidden matrix: the aspect-ratio factor differs between them."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 48, bias=False)
        self.down = nn.Linear(48, 16, bias=False)


def _polar(G: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The exact orthogonal factor U V^T of G = U S V^T (float64 SVD): a stand-in for both Newton-Schulz kernels."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).to(G.dtype)


def _one_step_each(shape, weight_decay, orthogonalise=None, monkeypatch=None, steps=1):
    """`steps` steps from the same weight and gradients: DeepSpeed's Muon with the group `deepspeed_muon` builds for
    this shape, and torch.optim.Muon(adjust_lr_fn="match_rms_adamw") with the OptimConfig's own lr and decay.
    Returns (initial weight, DeepSpeed's weight after the steps, torch's, DeepSpeed's group lr)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.muon import original_muon
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    from zaya_train.train.engine import deepspeed_muon

    if orthogonalise is not None:
        monkeypatch.setattr(original_muon, "zeropower_via_gram_newtonschulz", orthogonalise)
        monkeypatch.setattr(original_muon, "zeropower_via_newtonschulz5", orthogonalise)
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", orthogonalise)
    config = OptimConfig(name="muon", lr=1e-3, muon_lr=2e-2, weight_decay=weight_decay, muon_momentum=0.9)
    model = _TwoMatrices()
    groups, ds_optimizer = deepspeed_muon(model, config)
    [group] = [g for g in groups if g["name"] == f"muon_{shape[0]}x{shape[1]}"]
    [param] = group["params"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        param.copy_(torch.randn(shape, generator=generator))
    grads = [torch.randn(shape, generator=generator) for _ in range(steps)]
    initial = param.detach().clone()
    reference = nn.Parameter(initial.clone())

    # DeepSpeed's step, as `deepspeed.initialize` builds it from the optimizer entry and our groups (the engine's
    # own group resolution, then its Muon). On a whole 2-D weight MuonWithAuxAdam runs `muon_update` itself; under
    # ZeRO 1/2 the same `muon_update` runs on the gathered gradient and the same decay + lr step on the partition.
    ds_groups = DeepSpeedEngine._muon_param_groups([group], dict(ds_optimizer["params"]))
    ds = MuonWithAuxAdam(ds_groups)
    for grad in grads:
        param.grad = grad.clone()
        # muon_update is torch.compile'd; eager runs the same operations without a C++ build in a unit test.
        with torch.compiler.set_stance("force_eager"):
            ds.step()

    torch_muon = torch.optim.Muon(
        [reference], lr=config.resolved_muon_lr, weight_decay=config.resolved_muon_weight_decay,
        momentum=config.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw",
    )
    for grad in grads:
        reference.grad = grad.clone()
        torch_muon.step()
    return initial, param.detach().clone(), reference.detach().clone(), ds_groups[0]["lr"]


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_deepspeed_muon_lr_gives_torch_match_rms_adamw_step(shape, monkeypatch):
    """The two Muons differ in their Newton-Schulz kernels (torch: the quintic iteration in bf16; DeepSpeed: the
    same polynomial through the Gram form, in fp32 on CPU), so their updates differ by bf16 rounding (0.1-0.2% in
    RMS), far below what a wrong lr factor does (sqrt(3) for these shapes) but far above an exact comparison. The
    per-shape lr has to get right is the scale applied to the orthogonalised update, so the exact check swaps in
    one exact orthogonaliser (U V^T from the SVD) for both kernels: then the two steps must agree to fp32 rounding
    and the update RMS is Moonlight's 0.2 * lr by hand (U V^T of an [m, n] matrix, m >= n, has n unit singular
    values: RMS sqrt(n / (m n)) = 1/sqrt(max(m, n)), times 0.2 * sqrt(max(m, n))). A second step, whose direction
    mixes two gradients, checks that the momentum and Nesterov settings reach DeepSpeed's Muon too."""
    initial, ds_after, torch_after, ds_lr = _one_step_each(shape, 0.0, _polar, monkeypatch)
    muon_lr = 2e-2
    assert ds_lr == pytest.approx(muon_lr * 0.2 * math.sqrt(48) / math.sqrt(max(1, shape[0] / shape[1])))
    assert _rms(ds_after - initial) == pytest.approx(0.2 * muon_lr, rel=1e-5)
    torch.testing.assert_close(ds_after, torch_after, rtol=0, atol=1e-6)
    _, ds_after, torch_after, _ = _one_step_each(shape, 0.0, _polar, monkeypatch, steps=2)
    torch.testing.assert_close(ds_after, torch_after, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_deepspeed_muon_real_kernels_give_the_update_rms_of_torch_muon(shape):
    """With each implementation's own Newton-Schulz kernel: the update norms agree to the kernels' rounding
    (the same polynomial, bf16 against fp32), and the updates point the same way."""
    initial, ds_after, torch_after, _ = _one_step_each(shape, 0.0)
    ds_update, torch_update = ds_after - initial, torch_after - initial
    assert _rms(ds_update) == pytest.approx(_rms(torch_update), rel=0.01)  # measured 0.1-0.2%
    cosine = float((ds_update * torch_update).sum() / (ds_update.norm() * torch_update.norm()))
    assert cosine > 0.999


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_deepspeed_muon_weight_decay_matches_torch_muon(shape, monkeypatch):
    """Same weight decay setting: torch.optim.Muon decays by muon_lr * weight_decay (the unadjusted lr), so
    DeepSpeed's step, which decays by its group lr * group weight_decay, has to come out the same."""
    _, ds_after, torch_after, _ = _one_step_each(shape, 0.1, _polar, monkeypatch)
    torch.testing.assert_close(ds_after, torch_after, rtol=0, atol=1e-6)


def test_deepspeed_muon_refuses_settings_it_cannot_run():
    from zaya_train.train.config import ConfigError
    from zaya_train.train.engine import deepspeed_muon

    for kwargs, key in (({"muon_ns_steps": 3}, "optim.muon_ns_steps"), ({"muon_nesterov": False}, "optim.muon_nesterov")):
        with pytest.raises(ConfigError, match=key):
            deepspeed_muon(_TwoMatrices(), OptimConfig(name="muon", **kwargs))
