"""ZAYA1 model configuration: a typed dataclass with the field names and defaults of HF's `ZayaConfig`.

The defaults are the released ZAYA1-8B dimensions. Three presets cover the sizes this project trains:

    from zaya_train.model import preset
    cfg = preset("nano")                     # a few M parameters, trains on a CPU in minutes
    cfg = preset("small", num_hidden_layers=4)   # ~100M total; any field may be overridden

Fields that HF does not have (everything after `cca_time1`) only affect training, never the forward pass
of a loaded checkpoint, and are not written to HF exports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from zaya_train.kernels.dispatch import MODES as KERNEL_MODES

LAYER_TYPES = ("hybrid", "hybrid_sliding")


def default_rope_parameters() -> dict[str, dict[str, Any]]:
    return {
        "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
    }


@dataclass
class ZayaConfig:
    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=default_rope_parameters)
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    moe_intermediate_size: int = 2048
    num_experts: int = 16
    num_experts_per_tok: int = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 106
    attention_bias: bool = False
    lm_head_bias: bool = False
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2
    # Training-only fields (not part of the HF config).
    # HF initialises the key temperature to 0, which zeroes every key (uniform attention) and gives the key path
    # no gradient at step 0; 1.0 is the from-scratch choice (ZAYA1-8B report, arXiv 2605.05365, App. C). HF parity is unaffected:
    # a loaded checkpoint carries its own `temp`.
    temp_init: float = 1.0
    # Checkpoint each decoder layer's activations and recompute them in the backward pass.
    gradient_checkpointing: bool = False
    # Triton kernels for RMSNorm (+ residual scaling), CCA's convolutions + QK norm, the MoE experts and the fused
    # LM-head loss: "auto" (on a GPU where Triton imports), "triton" (also the CPU interpreter under
    # TRITON_INTERPRET=1) or "torch" (the PyTorch references); see zaya_train.kernels.dispatch. The same numbers
    # up to rounding; not in HF configs.
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        self.rope_parameters = {k: dict(v) for k, v in self.rope_parameters.items()}
        self.validate()

    def validate(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "moe_intermediate_size", "num_experts", "router_hidden_size", "cca_time0", "cca_time1",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ZayaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok != 1:
            raise ValueError(f"ZayaConfig.num_experts_per_tok must be 1 (ZAYA1 routes top-1), got {self.num_experts_per_tok!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ZayaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if (self.num_key_value_heads * self.head_dim) % 2:
            raise ValueError(
                "ZayaConfig.num_key_value_heads * head_dim must be even: half the value channels are current, "
                f"half delayed (got {self.num_key_value_heads} * {self.head_dim})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"ZayaConfig.hidden_act must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        if self.kernels not in KERNEL_MODES:
            raise ValueError(f"ZayaConfig.kernels must be one of {KERNEL_MODES}, got {self.kernels!r}")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"ZayaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"ZayaConfig.layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        for layer_type in self.layer_types:
            if layer_type not in LAYER_TYPES:
                raise ValueError(f"ZayaConfig.layer_types: unknown layer type {layer_type!r}, expected one of {LAYER_TYPES}")
        if "hybrid_sliding" in self.layer_types:
            if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window <= 0:
                raise ValueError(
                    f"ZayaConfig.sliding_window must be a positive integer when layer_types contains 'hybrid_sliding', "
                    f"got {self.sliding_window!r}"
                )
        for layer_type in set(self.layer_types):
            rope = self.rope_parameters.get(layer_type)
            if rope is None:
                raise ValueError(f"ZayaConfig.rope_parameters has no entry for layer type {layer_type!r}")
            if rope.get("rope_type", "default") != "default":
                raise ValueError(
                    f"ZayaConfig.rope_parameters[{layer_type!r}].rope_type={rope['rope_type']!r}: only 'default' is supported"
                )
            factor = rope.get("partial_rotary_factor", 1.0)
            rotary_dim = int(self.head_dim * factor)
            if not (0 < factor <= 1) or rotary_dim % 2:
                raise ValueError(
                    f"ZayaConfig.rope_parameters[{layer_type!r}].partial_rotary_factor={factor!r} must be in (0, 1] and "
                    f"give an even rotary dimension (head_dim * factor = {self.head_dim * factor})"
                )
            if not rope.get("rope_theta", 0) > 0:
                raise ValueError(f"ZayaConfig.rope_parameters[{layer_type!r}].rope_theta must be > 0")
        eos_ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, token_id in [("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id)] + [
            ("eos_token_id", t) for t in eos_ids
        ]:
            if token_id is not None and not (0 <= token_id < self.vocab_size):
                raise ValueError(f"ZayaConfig.{name}={token_id!r} is outside the vocabulary [0, {self.vocab_size})")

    # --- derived sizes -------------------------------------------------------------------------------------
    @property
    def query_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_router_classes(self) -> int:
        """Routed experts plus the skip class (index `num_experts`), whose output is zero."""
        return self.num_experts + 1

    @property
    def conv_state_len(self) -> int:
        """Past q/k projection columns the two causal convolutions look back over."""
        return self.cca_time0 + self.cca_time1 - 2

    def rotary_dim(self, layer_type: str) -> int:
        return int(self.head_dim * self.rope_parameters[layer_type].get("partial_rotary_factor", 1.0))

    # --- HF interop ----------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The fields HF's `ZayaConfig` knows, with `model_type`, ready for `config.json`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in TRAINING_ONLY_FIELDS}
        out["rope_parameters"] = {k: v for k, v in self.rope_parameters.items() if k in set(self.layer_types)}
        out["model_type"] = "zaya"
        out["architectures"] = ["ZayaForCausalLM"]
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ZayaConfig":
        if hf.get("model_type") != "zaya":
            raise ValueError(f"not a zaya config: model_type is {hf.get('model_type')!r}")
        known = {f.name for f in dataclasses.fields(cls)} - TRAINING_ONLY_FIELDS
        kwargs = {k: v for k, v in hf.items() if k in known}
        rope = kwargs.get("rope_parameters")
        if rope is not None:
            # A flat {"rope_theta": ...} dict (older exports) applies to every layer type.
            if "rope_theta" in rope:
                rope = {t: {"rope_type": "default", **{k: v for k, v in rope.items() if k != "rope_type"}} for t in LAYER_TYPES}
            kwargs["rope_parameters"] = {**default_rope_parameters(), **rope}
        return cls(**kwargs)


TRAINING_ONLY_FIELDS = frozenset({"temp_init", "gradient_checkpointing", "kernels"})

PRESETS: dict[str, dict[str, Any]] = {
    # The released ZAYA1-8B dimensions (HF defaults).
    "zaya1_8b": {},
    # ~100M total parameters, the ZAYA1 ratios (query latent D, KV latent D/4, 16 experts, router D/8).
    "small": dict(
        vocab_size=32768, hidden_size=512, num_hidden_layers=7, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, moe_intermediate_size=512, num_experts=16, router_hidden_size=64, max_position_embeddings=4096,
        rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
                         "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    # A few M parameters; sized to train on 2 CPU cores in minutes.
    "nano": dict(
        vocab_size=64, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, moe_intermediate_size=256, num_experts=4, router_hidden_size=32, max_position_embeddings=2048,
        rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
                         "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
}


def preset(name: str, **overrides: Any) -> ZayaConfig:
    """The config of a named preset (`nano`, `small`, `zaya1_8b`), with any fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ZayaConfig)}
    if unknown:
        raise ValueError(f"unknown ZayaConfig field(s) {sorted(unknown)} for preset {name!r}")
    return ZayaConfig(**{**PRESETS[name], **overrides})
