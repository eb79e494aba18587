"""The typed run configuration behind the `zaya-train` Hydra app (registered in Hydra's ConfigStore as `run_schema`).

Every key a recipe or a command line can set is a field here, so Hydra rejects an unknown key or a wrong type
before anything runs, and each section rejects impossible values when it is built (ZeRO stage 7, negative
steps, a missing data file), naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from zaya_train.cascade.config import CascadeConfig
from zaya_train.experiment.config import STAGES, ExperimentConfig, check_seeds, check_stages
from zaya_train.kernels.dispatch import MODES as KERNEL_MODES
from zaya_train.loading import check_model_source, resolve_checkpoint
from zaya_train.metrics import WandbConfig
from zaya_train.model import ZayaConfig, preset
from zaya_train.model.config import PRESETS
from zaya_train.plan import PlanConfig
from zaya_train.rl.config import RLConfig
from zaya_train.rsa.config import RSAConfig
from zaya_train.train.balancer import BalancerConfig
from zaya_train.train.optim import OptimConfig
from zaya_train.train.schedule import ScheduleConfig

DATA_KINDS = ("chain_sum", "pretrain", "sft")
# ZAYA1's pretraining, midtraining and SFT phases as recipes, each with the phase it starts from.
ZAYA1_PHASES = {"zaya1_pretrain1": None, "zaya1_pretrain2": "zaya1_pretrain1", "zaya1_midtrain": "zaya1_pretrain2",
                "zaya1_sft": "zaya1_midtrain"}
VERIFIERS = ("math", "exact")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A user mistake in the run configuration; the message names the key."""


def _require_files(path: str, key: str) -> None:
    from zaya_train.data.sources import resolve_files

    try:
        resolve_files(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from err


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _require_model_source(path: str, key: str) -> None:
    try:
        check_model_source(path)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from err


def _require_checkpoint(path: str, key: str) -> None:
    try:
        resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from err


VOCAB_MULTIPLE = 64
MAX_VOCAB_PADDING = 0.05


def padded_vocab_size(tokenizer_size: int) -> int:
    """The tokenizer's size rounded up to a multiple of 64 (aligned LM-head GEMMs) when that adds at most 5%, else
    the size itself. Padding rows are outputs no target ever names: the softmax still spreads probability over
    them and, with tied embeddings, they are input rows too, so early training spends its first steps pushing
    them down. With a large vocabulary that cost is noise; with a tiny one it is not (the nano task's 20-token
    character vocabulary padded to 64 learned several times more slowly), hence the bound."""
    padded = -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return padded if padded - tokenizer_size <= MAX_VOCAB_PADDING * tokenizer_size else tokenizer_size


@dataclass
class ModelConfig:
    """`preset` names a ZAYA1 size; any other field left at None keeps the preset's value."""

    preset: str = "nano"
    vocab_size: int | None = None  # None: the tokenizer's size, rounded up to a multiple of 64 if that adds <= 5%
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
    # Triton kernels (RMSNorm with the residual scaling, the fused LM-head loss): auto | triton | torch.
    kernels: str = "auto"
    # Initial weights: an HF `zaya` directory, a trainer checkpoint or a run directory (its latest checkpoint).
    init_from: str | None = None

    def __post_init__(self) -> None:
        _require(self.preset in PRESETS, "model.preset", f"unknown preset {self.preset!r}, expected one of {sorted(PRESETS)}")
        _require(self.kernels in KERNEL_MODES, "model.kernels", f"must be one of {KERNEL_MODES}, got {self.kernels!r}")
        if self.init_from is not None:
            _require_model_source(self.init_from, "model.init_from")

    def build(self, tokenizer_size: int, special_ids: dict[str, int | None]) -> ZayaConfig:
        """The model config for a tokenizer of `tokenizer_size` tokens: `vocab_size` if set, else
        `padded_vocab_size(tokenizer_size)`."""
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
        overrides["vocab_size"] = self.vocab_size if self.vocab_size is not None else padded_vocab_size(tokenizer_size)
        overrides.update({k: v for k, v in special_ids.items() if v is not None})
        try:
            return preset(self.preset, **overrides)
        except ValueError as err:
            raise ConfigError(str(err).replace("ZayaConfig.", "model.")) from err


@dataclass
class DataSourceConfig:
    """One source of a weighted mixture (`data.sources`, zaya_train/data/weighted.py): a local file / directory /
    glob (`path`) or a hub dataset (`hub_name`), and its `weight` (relative; normalised over the sources)."""

    name: str = MISSING
    path: str | None = None
    hub_name: str | None = None
    weight: float = 1.0
    split: str = "train"
    format: str | None = None
    text_field: str = "text"
    messages_field: str = "messages"

    def __post_init__(self) -> None:
        # A list entry without a name gets the literal "???" (OmegaConf fills list elements from the defaults).
        _require(bool(self.name) and self.name != "???" and "/" not in self.name, "data.sources.name",
                 f"must be a non-empty name without '/', got {self.name!r}")
        key = f"data.sources.{self.name}"
        _require(self.path is not None or self.hub_name is not None, f"{key}.path",
                 "no data: set path (a local file, directory or glob) or hub_name")
        _require(self.path is None or self.hub_name is None, f"{key}.path",
                 f"set one of path and hub_name, got path={self.path!r}, hub_name={self.hub_name!r}")
        _require(self.weight > 0, f"{key}.weight", f"must be > 0, got {self.weight}")
        if self.path is not None:
            _require_files(self.path, f"{key}.path")


@dataclass
class DataConfig:
    """`kind`: chain_sum (the nano task, generated offline), pretrain (plain text) or sft (chats). Text and chats
    come from `path` / `hub_name`, or from `sources`, a weighted mixture."""

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
    # SFT: answer-preserving trimming of <think> traces to seq_len (ZAYA1-8B report, arXiv 2605.05365, §III-A).
    ap_trim: bool = True
    num_samples: int = 64_000  # chain_sum: training problems per epoch
    # Passes over the data before the run stops (with a checkpoint), whatever trainer.max_steps says; None: no limit.
    num_epochs: int | None = None
    # SFT: aggregation chats (recipe=build_aggregation_sft's aggregation_sft.jsonl) mixed in as `mix_share` of
    # the samples, tokenized the way RL feeds aggregation prompts (zaya_train/data/mixing.py).
    mix_path: str | None = None
    mix_share: float = 0.0
    # A weighted mixture instead of `path` (zaya_train/data/weighted.py): [{name, path | hub_name, weight}, ...].
    sources: list[DataSourceConfig] = field(default_factory=list)
    # What the weights are shares of: "tokens" (documents drawn in inverse proportion to their mean length) or
    # "documents".
    share_unit: str = "tokens"

    def __post_init__(self) -> None:
        _require(self.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}, got {self.kind!r}")
        _require(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _require(self.micro_batch_size >= 1, "data.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.num_samples >= 1, "data.num_samples", f"must be >= 1, got {self.num_samples}")
        _require(self.num_epochs is None or self.num_epochs >= 1, "data.num_epochs",
                 f"must be >= 1 or null, got {self.num_epochs}")
        if self.sources:
            from zaya_train.data.weighted import UNITS

            _require(self.share_unit in UNITS, "data.share_unit", f"must be one of {UNITS}, got {self.share_unit!r}")
            _require(self.kind != "chain_sum", "data.sources", "the chain_sum task is generated, not read from sources")
            _require(self.path is None and self.hub_name is None, "data.sources",
                     "set either data.sources or data.path / data.hub_name, not both")
            names = [source.name for source in self.sources]
            _require(len(set(names)) == len(names), "data.sources", f"names must be unique, got {names}")
            _require(self.mix_path is None or "aggregation" not in names, "data.sources",
                     "the name 'aggregation' is data.mix_path's in the share metrics; rename the source")
        elif self.kind != "chain_sum":
            _require(self.path is not None or self.hub_name is not None, "data.path",
                     f"data.kind={self.kind} needs data.path (or data.hub_name, or data.sources)")
        if self.path is not None:
            _require_files(self.path, "data.path")
        if self.tokenizer not in ("char", "bpe"):
            _require(Path(self.tokenizer).is_dir(), "data.tokenizer",
                     f"must be char, bpe or a tokenizer directory, got {self.tokenizer!r}")
        _require(0 <= self.mix_share <= 1, "data.mix_share", f"must be in [0, 1], got {self.mix_share}")
        if self.mix_path is not None:
            _require(self.kind == "sft", "data.mix_path",
                     f"only data.kind=sft mixes in chats, got {self.kind!r}")
            _require(Path(self.mix_path).is_file(), "data.mix_path", f"{self.mix_path} is not a file")
        _require(self.mix_share == 0 or self.mix_path is not None, "data.mix_path",
                 f"data.mix_share={self.mix_share} needs a file of aggregation chats to draw from")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    # Extra DeepSpeed JSON keys merged over the generated config (e.g. {"zero_optimization": {...}}).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.precision in PRECISIONS, "deepspeed.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        _require(self.gradient_accumulation_steps >= 1, "deepspeed.gradient_accumulation_steps", "must be >= 1")
        _require(self.gradient_clipping >= 0, "deepspeed.gradient_clipping", "must be >= 0 (0 disables clipping)")


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
    # chain_sum runs: held-out problems decoded at the end (greedy and temperature-1 accuracy); 0 skips it.
    eval_problems: int = 200
    # Ranks one sequence is split over. ZAYA1 trained its 32K and 131K phases with context parallelism (ZAYA1-8B
    # report, arXiv 2605.05365, §VII-G); this trainer has none, so a recipe that asks for it refuses to start
    # rather than train another setup under the phase's name.
    context_parallel: int = 1

    def __post_init__(self) -> None:
        _require(self.context_parallel >= 1, "trainer.context_parallel", f"must be >= 1, got {self.context_parallel}")
        _require(self.context_parallel == 1, "trainer.context_parallel",
                 f"{self.context_parallel} asks for context parallelism, which zaya-train does not have yet (CCA's "
                 "convolutions would need each shard to receive the previous shard's last tokens); set "
                 "trainer.context_parallel=1 to train whole windows on each rank, after checking with recipe=plan "
                 "plan.seq_len=<data.seq_len> that one fits")
        _require(self.max_steps >= 0, "trainer.max_steps", f"must be >= 0, got {self.max_steps}")
        _require(self.save_interval >= 1, "trainer.save_interval", f"must be >= 1, got {self.save_interval}")
        _require(self.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {self.keep_last}")
        _require(self.log_interval >= 1, "trainer.log_interval", f"must be >= 1, got {self.log_interval}")
        _require(self.max_nonfinite_in_row >= 1, "trainer.max_nonfinite_in_row", "must be >= 1")
        if self.resume not in ("auto", "none"):
            _require_checkpoint(self.resume, "trainer.resume")
        _require(self.peak_flops is None or self.peak_flops > 0, "trainer.peak_flops", "must be > 0")
        _require(self.eval_problems >= 0, "trainer.eval_problems", f"must be >= 0, got {self.eval_problems}")


@dataclass
class EvalConfig:
    """recipe=eval_rsa: what to evaluate on and how to sample (the RSA parameters are in `rsa`)."""

    # rg:<reasoning-gym task> | nano_chain_sum | a local jsonl (question, answer) | hub:<dataset name>
    data: str = "rg:chain_sum"
    num_problems: int = 50
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_batch_size: int = 64
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _require(self.num_problems >= 1, "eval.num_problems", f"must be >= 1, got {self.num_problems}")
        _require(self.temperature >= 0, "eval.temperature", f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "eval.top_k", f"must be >= 0, got {self.top_k}")
        _require(self.max_batch_size >= 1, "eval.max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        special = self.data.startswith(("rg:", "hub:")) or self.data in ("nano_chain_sum", "nano_chain_sum:validation")
        _require(special or Path(self.data).is_file(), "eval.data",
                 "must be rg:<task>, nano_chain_sum, nano_chain_sum:validation, hub:<name> or an existing jsonl file, "
                 f"got {self.data!r}")


@dataclass
class AggregationSFTConfig:
    """recipe=build_aggregation_sft (zaya_train/rsa/aggregation_sft.py): teacher-written aggregation chats for
    the co-design SFT cold start. Tails and prompts follow `rsa` (c, tau, template, variant, markers)."""

    problems: str | None = None  # jsonl rows {"question", "answer" (optional), "rollouts": [text, ...]}
    teacher: str | None = None  # an HF zaya directory, a trainer checkpoint or a run directory (its latest)
    samples_per_problem: int = 1  # aggregation chats per problem, each from its own random rsa.c-subset
    max_new_tokens: int = 40960
    temperature: float = 1.0
    top_p: float = 1.0
    max_batch_size: int = 64  # prompts per teacher call; the sampling seeds follow these chunks
    verifier: str = "math"  # what `correct` records for rows with an answer: math (math-verify) | exact
    answer_marker: str | None = None  # the verifier's fallback when a completion has no \boxed{} answer
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("samples_per_problem", "max_new_tokens", "max_batch_size"):
            value = getattr(self, name)
            _require(value >= 1, f"aggregation_sft.{name}", f"must be >= 1, got {value}")
        _require(self.temperature >= 0, "aggregation_sft.temperature",
                 f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "aggregation_sft.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.verifier in VERIFIERS, "aggregation_sft.verifier",
                 f"must be one of {VERIFIERS}, got {self.verifier!r}")
        _require(self.answer_marker is None or self.answer_marker != "", "aggregation_sft.answer_marker",
                 "must be null or a non-empty string")


@dataclass
class RunConfig:
    recipe: str = "nano"
    run_dir: str = "runs/${recipe}/${now:%Y%m%d-%H%M%S}"
    seed: int = 0
    # Sections are built (and checked) in this order: the keys users type come before the ones that copy them
    # by interpolation (schedule.total_steps: ${trainer.max_steps}), so an error names the key that was typed.
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw"))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    rsa: RSAConfig = field(default_factory=RSAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    # recipe=nano (the main job): which stages run, the RL seeds (None: [seed]), the stages' budgets
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seeds: list[int] | None = None
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)  # recipe=nano_cascade
    # recipe=plan: the cluster it sizes the run for (`cluster=mi300x nodes=128`), the rest under `plan.*`
    cluster: str = "mi300x"
    nodes: int = 1
    plan: PlanConfig = field(default_factory=PlanConfig)
    # recipe=build_aggregation_sft
    aggregation_sft: AggregationSFTConfig = field(default_factory=AggregationSFTConfig)
    # recipe=export and recipe=eval_rsa: a run directory, a trainer checkpoint (eval_rsa also: an HF directory)
    checkpoint: str | None = None
    out: str | None = None  # recipe=export


def validate(cfg: RunConfig) -> None:
    """Checks across sections (each section checks its own values when built). Raises ConfigError."""
    if cfg.recipe == "nano":
        try:
            check_stages(list(cfg.stages))
            check_seeds(list(cfg.seeds) if cfg.seeds is not None else [cfg.seed])
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if cfg.recipe in ("export", "eval_rsa"):
        _require(cfg.checkpoint is not None, "checkpoint", f"recipe={cfg.recipe} needs checkpoint=PATH (a run directory or a checkpoint)")
    if cfg.recipe == "eval_rsa":
        _require_model_source(cfg.checkpoint, "checkpoint")
    if cfg.recipe in ("rl", "warmstart"):
        _require(cfg.model.init_from is not None, "model.init_from",
                 f"recipe={cfg.recipe} needs the policy to start from (a run directory, a trainer checkpoint or an HF "
                 "directory)")
    if cfg.recipe == "rl":
        _require(cfg.rl.prompts_per_step % max(1, int(os.environ.get("WORLD_SIZE", "1"))) == 0, "rl.prompts_per_step",
                 f"{cfg.rl.prompts_per_step} is not a multiple of the {os.environ.get('WORLD_SIZE')} ranks")
        counts = cfg.rl.codesign.problems_per_round(cfg.rl.prompts_per_step)
        _require(all(counts), "rl.codesign.share",
                 f"{cfg.rl.codesign.share} of {cfg.rl.prompts_per_step} problems per step leaves a round without a "
                 f"problem (problems per round: {counts}); raise rl.prompts_per_step or the share")
        _require(cfg.rsa.c <= cfg.rl.group_size or cfg.rl.codesign.share == 0, "rsa.c",
                 f"{cfg.rsa.c} tails per aggregation prompt need a population of at least that many "
                 f"(rl.group_size={cfg.rl.group_size})")
    if cfg.recipe == "build_aggregation_sft":
        problems = cfg.aggregation_sft.problems
        _require(problems is not None and Path(problems).is_file(), "aggregation_sft.problems",
                 f"recipe=build_aggregation_sft needs a jsonl file of problems with rollouts, "
                 f"got {problems!r}")
        _require(cfg.aggregation_sft.teacher is not None, "aggregation_sft.teacher",
                 "recipe=build_aggregation_sft needs the teacher (an HF zaya directory, a trainer checkpoint "
                 "or a run directory)")
        _require_model_source(cfg.aggregation_sft.teacher, "aggregation_sft.teacher")
    if cfg.recipe == "zaya1_sft":
        _require(cfg.data.kind == "sft", "data.kind",
                 f"recipe=zaya1_sft trains on chats (sft), got {cfg.data.kind!r}")
        _require(cfg.data.mix_path is not None, "data.mix_path",
                 "recipe=zaya1_sft needs the aggregation chats of recipe=build_aggregation_sft "
                 "(recipe=sft trains without them)")
    if cfg.recipe in ZAYA1_PHASES:
        _require(cfg.data.tokenizer not in ("char", "bpe"), "data.tokenizer",
                 f"recipe={cfg.recipe} needs the model's tokenizer directory, got {cfg.data.tokenizer!r}")
        before = ZAYA1_PHASES[cfg.recipe]
        _require(before is None or cfg.model.init_from is not None, "model.init_from",
                 f"recipe={cfg.recipe} continues from {before}: give its run directory (or a trainer checkpoint or "
                 "an HF directory)")
    if cfg.recipe == "export":
        _require_checkpoint(cfg.checkpoint, "checkpoint")
        _require(cfg.out is not None, "out", "recipe=export needs out=PATH")
