"""The typed run configuration behind the `zaya-train` Hydra app (registered in Hydra's ConfigStore as `run_schema`).

Every key a recipe or a command line can set is a field here, so Hydra rejects an unknown key or a wrong type
before anything runs, and `validate()` rejects impossible values (ZeRO stage 7, negative steps, a missing data
file), naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zaya_train.model import ZayaConfig, preset
from zaya_train.model.config import PRESETS
from zaya_train.train.balancer import BalancerConfig
from zaya_train.train.metrics import WandbConfig
from zaya_train.train.optim import OptimConfig
from zaya_train.train.schedule import ScheduleConfig

DATA_KINDS = ("chain_sum", "pretrain", "sft")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A user mistake in the run configuration; the message names the key."""


@dataclass
class ModelConfig:
    """`preset` names a ZAYA1 size; any other field left at None keeps the preset's value."""

    preset: str = "nano"
    vocab_size: int | None = None  # None: the tokenizer's size (rounded up to a multiple of 64)
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    moe_intermediate_size: int | None = None
    num_experts: int | None = None
    router_hidden_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None  # applies to every layer type
    cca_time0: int | None = None
    cca_time1: int | None = None
    initializer_range: float | None = None
    temp_init: float | None = None
    gradient_checkpointing: bool = False
    # Initial weights: an HF `zaya` directory, a trainer checkpoint or a run directory (its latest checkpoint).
    init_from: str | None = None

    def build(self, vocab_size: int, special_ids: dict[str, int | None]) -> ZayaConfig:
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("preset", "rope_theta", "init_from", "vocab_size")
            and getattr(self, f.name) is not None
        }
        base = preset(self.preset)
        if self.rope_theta is not None:
            overrides["rope_parameters"] = {
                k: {**v, "rope_theta": self.rope_theta} for k, v in base.rope_parameters.items()
            }
        overrides["vocab_size"] = self.vocab_size if self.vocab_size is not None else vocab_size
        overrides.update({k: v for k, v in special_ids.items() if v is not None})
        try:
            return preset(self.preset, **overrides)
        except ValueError as err:
            raise ConfigError(str(err).replace("ZayaConfig.", "model.")) from err


@dataclass
class DataConfig:
    """`kind`: chain_sum (the nano task, generated offline), pretrain (plain text) or sft (chats)."""

    kind: str = "chain_sum"
    path: str | None = None  # local jsonl / parquet / text file or glob
    hub_name: str | None = None  # a hub dataset name (real runs only; never in tests)
    split: str = "train"
    format: str | None = None  # jsonl | parquet | text; None: from the file suffix
    text_field: str = "text"
    messages_field: str = "messages"
    streaming: bool = False
    seq_len: int = 80
    micro_batch_size: int = 8
    shuffle: bool = True
    # "char" (the nano task's characters), "bpe" (trained by the run on its own data) or a tokenizer path.
    tokenizer: str = "char"
    bpe_vocab_size: int = 4096
    # SFT: answer-preserving trimming of <think> traces to seq_len (research/zaya1-spec.md 6.2).
    ap_trim: bool = True
    num_samples: int = 64_000  # chain_sum: training problems per epoch


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    # Extra DeepSpeed JSON keys merged over the generated config (e.g. {"zero_optimization": {...}}).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 500
    save_interval: int = 100
    keep_last: int = 3
    resume: str = "auto"  # auto | none | a checkpoint directory
    log_interval: int = 10
    max_nonfinite_in_row: int = 5
    progress_bar: bool = True
    peak_flops: float | None = None  # per device, for MFU; None looks the device up


@dataclass
class RunConfig:
    recipe: str = "nano"
    run_dir: str = "runs/${recipe}/${now:%Y%m%d-%H%M%S}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw"))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # recipe=export
    checkpoint: str | None = None
    out: str | None = None


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: RunConfig) -> None:
    """Checks values no type can express. Raises ConfigError naming the key."""
    _require(
        cfg.model.preset in PRESETS,
        "model.preset",
        f"unknown preset {cfg.model.preset!r}, expected one of {sorted(PRESETS)}",
    )
    if cfg.recipe == "export":
        _require(
            cfg.checkpoint is not None,
            "checkpoint",
            "recipe=export needs checkpoint=PATH (a run directory or a checkpoint)",
        )
        _require(cfg.out is not None, "out", "recipe=export needs out=PATH")
        _require(Path(cfg.checkpoint).exists(), "checkpoint", f"{cfg.checkpoint} does not exist")
        return
    t, ds, data = cfg.trainer, cfg.deepspeed, cfg.data
    _require(
        ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {ds.zero_stage}"
    )
    _require(
        ds.precision in PRECISIONS,
        "deepspeed.precision",
        f"must be one of {PRECISIONS}, got {ds.precision!r}",
    )
    _require(ds.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps", "must be >= 1")
    _require(ds.gradient_clipping >= 0, "deepspeed.gradient_clipping", "must be >= 0 (0 disables clipping)")
    _require(t.max_steps >= 0, "trainer.max_steps", f"must be >= 0, got {t.max_steps}")
    _require(t.save_interval >= 1, "trainer.save_interval", f"must be >= 1, got {t.save_interval}")
    _require(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}")
    _require(t.log_interval >= 1, "trainer.log_interval", f"must be >= 1, got {t.log_interval}")
    _require(t.max_nonfinite_in_row >= 1, "trainer.max_nonfinite_in_row", "must be >= 1")
    _require(
        t.resume in ("auto", "none") or Path(t.resume).exists(),
        "trainer.resume",
        f"must be auto, none or an existing checkpoint path, got {t.resume!r}",
    )
    _require(data.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}, got {data.kind!r}")
    _require(data.seq_len >= 2, "data.seq_len", f"must be >= 2, got {data.seq_len}")
    _require(
        data.micro_batch_size >= 1, "data.micro_batch_size", f"must be >= 1, got {data.micro_batch_size}"
    )
    if data.kind != "chain_sum":
        _require(
            data.path is not None or data.hub_name is not None,
            "data.path",
            f"data.kind={data.kind} needs data.path (or data.hub_name)",
        )
        if data.path is not None:
            from zaya_train.data.sources import resolve_files

            try:
                resolve_files(data.path)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"data.path: {err}") from err
    if data.tokenizer not in ("char", "bpe"):
        _require(
            Path(data.tokenizer).is_dir(),
            "data.tokenizer",
            f"must be char, bpe or a tokenizer directory, got {data.tokenizer!r}",
        )
    if cfg.model.init_from is not None:
        _require(
            Path(cfg.model.init_from).exists(), "model.init_from", f"{cfg.model.init_from} does not exist"
        )
