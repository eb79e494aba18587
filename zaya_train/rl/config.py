"""`RLConfig`: every `rl.*` key of `recipe=rl` (the run config's `rl` section; presets in conf/rl/).

    zaya-train recipe=rl model.init_from=runs/nano/base rl=nano rl.codesign.share=0.5 rl.codesign.rounds=2

Each value is checked when the section is built, and a bad one stops the command naming the key.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from zaya_train.rl.algorithms import ADVANTAGE_KINDS, AGGREGATION_KINDS, TRUST_REGIONS

CODESIGN_SOURCES = ("self", "expert", "mixed")
# rl.data forms backed by a file: the prefix, then the path.
FILE_DATA_PREFIXES = ("code:", "codeio_output:", "codeio_input:", "behaviour:")
DATA_FORMS = ("nano_chain_sum, rlve, rg:<task>, hub:<name>, code:<jsonl>, codeio_output:<jsonl>, codeio_input:<jsonl>, "
              "behaviour:<jsonl> or a question/answer jsonl")


class RLConfigError(ValueError):
    """A bad `rl.*` value; the message starts with the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise RLConfigError(f"{key}: {message}")


def _require_data(data: str, key: str) -> None:
    if data in ("nano_chain_sum", "rlve") or data.startswith(("rg:", "hub:")):
        return
    path = data.split(":", 1)[1] if data.startswith(FILE_DATA_PREFIXES) else data
    _require(Path(path).is_file(), key, f"must be one of {DATA_FORMS}; no such file: {path!r}")


@dataclass
class EnvironmentConfig:
    """One environment of a mixed batch: its problems come from `data` (any form of `rl.data`)."""

    name: str = MISSING
    """The environment's name in the metrics (reward/env/<name>, outcomes/<name>/<outcome>)."""
    data: str = MISSING
    share: float = 1.0
    """Relative share of the step's plain problems (normalised over the environments)."""

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "rl.environments.name",
                 f"must be a non-empty name without '/', got {self.name!r}")
        _require(self.share > 0, "rl.environments.share", f"must be > 0, got {self.share}")
        _require_data(self.data, f"rl.environments.{self.name}.data")


@dataclass
class CurriculumConfig:
    """rl.data=rlve: the RLVE adaptive curriculum over reasoning-gym tasks (zaya_train.rl.curriculum)."""

    environments: list[str] = field(default_factory=list)
    """reasoning-gym task names with curricula; empty: the default list of zaya_train.rl.curriculum."""
    start_difficulty: int = 0
    up_threshold: float = 0.7
    """A group solve rate above this at the current difficulty raises it by one; a rate of 0 lowers it."""
    instruction: str = ""
    """Appended to every question (e.g. how to format the final answer)."""

    def __post_init__(self) -> None:
        _require(self.start_difficulty >= 0, "rl.curriculum.start_difficulty", f"must be >= 0, got {self.start_difficulty}")
        _require(0 <= self.up_threshold < 1, "rl.curriculum.up_threshold", f"must be in [0, 1), got {self.up_threshold}")


@dataclass
class FilterConfig:
    """Drop problems the starting policy already solves (ZAYA1 re-filters every stage's data with the policy it
    starts from): before the first step, `samples` samples of each of the source's first `pool` problems."""

    pass_rate: float | None = None
    """Problems solved at this rate or more are dropped; None: no filtering."""
    samples: int = 4
    pool: int = 256
    """Problems examined (all rows of a smaller file); training then cycles over the kept ones."""
    max_new_tokens: int | None = None
    """Response budget of the filtering samples; None: rl.max_new_tokens."""

    def __post_init__(self) -> None:
        _require(self.pass_rate is None or 0 < self.pass_rate <= 1, "rl.filter.pass_rate",
                 f"must be in (0, 1] or null, got {self.pass_rate}")
        _require(self.samples >= 1, "rl.filter.samples", f"must be >= 1, got {self.samples}")
        _require(self.pool >= 1, "rl.filter.pool", f"must be >= 1, got {self.pool}")
        _require(self.max_new_tokens is None or self.max_new_tokens >= 1, "rl.filter.max_new_tokens",
                 f"must be >= 1 or null, got {self.max_new_tokens}")


@dataclass
class CodeRewardConfig:
    """Sandboxed execution of code completions (code:, codeio_input: data; zaya_train.rewards.CodeVerifier)."""

    time_limit_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    max_workers: int = 4
    allow_unisolated: bool = False
    """Run programs without namespaces when the sandbox cannot isolate them (rlimits and a temporary directory
    only): for machines without user namespaces, on trusted models only."""

    def __post_init__(self) -> None:
        _require(self.time_limit_s > 0, "rl.code.time_limit_s", f"must be > 0, got {self.time_limit_s}")
        _require(self.memory_mb >= 16, "rl.code.memory_mb", f"must be >= 16, got {self.memory_mb}")
        _require(self.max_output_bytes >= 1, "rl.code.max_output_bytes", f"must be >= 1, got {self.max_output_bytes}")
        _require(self.max_workers >= 1, "rl.code.max_workers", f"must be >= 1, got {self.max_workers}")


@dataclass
class RewardModelConfig:
    """behaviour: data: a sequence-classification reward model, gated by the prompts' instruction constraints."""

    path: str | None = None
    """A local AutoModelForSequenceClassification directory (with its tokenizer)."""
    batch_size: int = 16
    max_length: int = 4096
    fail_reward: float = 0.0
    """The reward of a response that breaks one of its prompt's constraints."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "rl.reward_model.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_length >= 8, "rl.reward_model.max_length", f"must be >= 8, got {self.max_length}")
        _require(self.path is None or Path(self.path).is_dir(), "rl.reward_model.path",
                 f"no such directory: {self.path}")


@dataclass
class CodesignConfig:
    """Online Markovian RSA aggregation prompts mixed into the RL batch (the RSA parameters are `rsa.*`)."""

    share: float = 0.0
    """Fraction of the step's generated sequences that are aggregation outputs (0: plain RL)."""
    rounds: int = 1
    """Deepest aggregation round trained; round t is built from this step's round-(t-1) outputs."""
    round_weights: list[float] | None = None
    """How `share` splits over rounds 1..rounds (normalised; non-increasing); None: evenly."""
    max_new_tokens: int = 16
    """New-token budget of aggregation outputs."""
    source: str = "self"
    """Round-1 tails from the policy's own round-0 samples (self), from `expert_file` (expert), or half each."""
    expert_file: str | None = None
    """jsonl of {"question", "answer", "candidates": [text, ...]} for source=expert|mixed."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.share <= 1.0, "rl.codesign.share", f"must be in [0, 1], got {self.share}")
        _require(self.rounds >= 0, "rl.codesign.rounds", f"must be >= 0, got {self.rounds}")
        _require(self.max_new_tokens >= 1, "rl.codesign.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(self.source in CODESIGN_SOURCES, "rl.codesign.source",
                 f"must be one of {CODESIGN_SOURCES}, got {self.source!r}")
        if self.share > 0:
            _require(self.rounds >= 1, "rl.codesign.rounds", "must be >= 1 when rl.codesign.share > 0")
        if self.round_weights is not None:
            weights = list(self.round_weights)
            _require(len(weights) == self.rounds, "rl.codesign.round_weights",
                     f"needs one weight per round ({self.rounds}), got {len(weights)}")
            _require(all(w >= 0 for w in weights) and sum(weights) > 0, "rl.codesign.round_weights",
                     f"must be non-negative with a positive sum, got {weights}")
            _require(all(a >= b for a, b in itertools.pairwise(weights)), "rl.codesign.round_weights",
                     f"must be non-increasing (round t+1 is built from round t's outputs), got {weights}")
        if self.source != "self":
            _require(self.expert_file is not None, "rl.codesign.expert_file",
                     f"rl.codesign.source={self.source} needs an expert_file")
        if self.expert_file is not None:
            _require(Path(self.expert_file).is_file(), "rl.codesign.expert_file",
                     f"no such file: {self.expert_file}")

    def weights(self) -> list[float]:
        raw = list(self.round_weights) if self.round_weights is not None else [1.0] * self.rounds
        total = sum(raw)
        return [w / total for w in raw]

    def problems_per_round(self, plain_problems: int) -> list[int]:
        """Problems that get round t = 1..rounds in a step with `plain_problems` plain ones: the share of
        sequences that are round t's outputs is share * weight_t, all groups of G, so round t takes
        round(P * share * w_t / (1 - share)) problems, capped by P and by the round before. At share 1 every
        problem gets every round; the plain samples are still generated (they are round 1's population) and
        trained, so the aggregation share is then rounds / (rounds + 1)."""
        if self.share == 0 or self.rounds == 0:
            return []
        counts, previous = [], plain_problems
        for weight in self.weights():
            k = plain_problems if self.share >= 1 else round(plain_problems * self.share * weight / (1 - self.share))
            previous = min(previous, k)
            counts.append(previous)
        return counts


@dataclass
class WarmStartConfig:
    """recipe=warmstart: supervised steps on plain and aggregation prompts built from the initial policy's own
    samples (ZAYA1's self-aggregation cold start), before RL."""

    pool_problems: int = 608
    """Problems whose rsa.n samples (from the initial policy) form the candidate pool, over all ranks."""
    batch_size: int = 64
    """Rows per micro-batch."""
    aggregation_share: float = 0.5
    """Fraction of rows that are aggregation prompts (the rest: plain prompts)."""
    answer_only_share: float = 0.5
    """Fraction of aggregation prompts whose candidates are cut to their answer (the shape of round-2 prompts,
    whose population is round-1 outputs)."""
    answer_marker: str = "A"
    """Text whose last occurrence starts a candidate's answer."""
    answer_format: str = "A{answer}"
    """The aggregation target: the reference answer in this format (answer-only target), then EOS."""

    def __post_init__(self) -> None:
        _require(self.pool_problems >= 1, "rl.warmstart.pool_problems", f"must be >= 1, got {self.pool_problems}")
        _require(self.batch_size >= 1, "rl.warmstart.batch_size", f"must be >= 1, got {self.batch_size}")
        for key in ("aggregation_share", "answer_only_share"):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"rl.warmstart.{key}", f"must be in [0, 1], got {value}")
        _require("{answer}" in self.answer_format, "rl.warmstart.answer_format",
                 f"must contain {{answer}}, got {self.answer_format!r}")


@dataclass
class RLConfig:
    """The RL loop (zaya_train.rl.loop): rollouts from `data`, verifier rewards, the ZAYA1 loss spine."""

    data: str = "nano_chain_sum"
    """nano_chain_sum | rlve (rl.curriculum) | rg:<reasoning-gym task> | hub:<dataset name> | code:<jsonl> |
    codeio_output:<jsonl> | codeio_input:<jsonl> | behaviour:<jsonl> | a local jsonl of question/answer.
    Ignored when `environments` is set."""
    environments: list[EnvironmentConfig] = field(default_factory=list)
    """A mixed batch: each problem drawn from one environment with probability proportional to its share."""
    prompts_per_step: int = 8
    """Plain problems per step, over all ranks (a multiple of the world size)."""
    group_size: int = 8
    """G: samples per problem (and aggregation prompts per problem and round)."""
    minibatches: int = 1
    """Optimizer steps per batch."""
    epochs: int = 1
    """Passes over a batch."""
    max_prompt_tokens: int = 256
    """Plain prompts longer than this (BOS included) are skipped."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = "plain"
    """maxrl | grpo | rloo | plain."""
    dynamic_sampling: bool = False
    """Drop groups whose task rewards are all 0 or all 1."""
    max_refills: int = 0
    """Extra passes of fresh plain problems to refill dropped groups."""
    trust_region: str = "dppo_tv"
    """dppo_tv | ppo_clip | none."""
    delta: float = 0.1
    clip_low: float = 0.2
    clip_high: float = 0.2
    tis_cap: float = 2.0
    """Truncated importance sampling cap against the engine's logprobs; 0 turns the correction off."""
    loss_aggregation: str = "token_mean"
    """dr_grpo | token_mean | sequence_mean."""
    length_bonus: bool = False
    """ZAYA1's difficulty-scaled length reward (l_max = max_new_tokens)."""
    canary: bool = True
    """Zero the reward of LZ77-compressible (looping) rollouts."""
    kl_coef: float = 0.0
    """k3 KL to the frozen initial policy; 0: no reference model."""
    router_replay: bool = True
    """The trainer's forward replays the experts the engine chose for every token and layer."""
    shared_prompt_forward: bool = False
    """Training forwards run each distinct prompt of a micro-batch once (a group's G rollouts share it) and the
    responses on its copied cache rows: less work where prompts repeat and are not much shorter than responses.
    No activation checkpointing on that path; off under ZeRO-3 (one forward per micro-batch there)."""
    update_expert_biases: bool = False
    """Move the routers' balancing biases during RL (off: the rollout policy changes only by gradient steps)."""
    max_batch_size: int | None = None
    """Rows the rollout engine decodes at once; None: a whole round of the step."""
    compile_decode: bool = False
    """The rollout engine's one-token decode step runs through torch.compile (inductor, dynamic shapes): the first
    step compiles it (tens of seconds on a CPU, where inductor needs a C++ compiler), later steps decode faster
    (a nano step of 128 x 61 tokens: 0.37 -> 0.24 s on the development CPU). The engine's logprobs then differ
    from the eager step's by float rounding, which `rl/logprob_diff_max` shows."""
    diagnostic_interval: int = 1
    """Every this many steps, measure the train/inference logprob gap under the other routing too (without replay
    when replay is on: `rl/logprob_diff_max_noreplay`). Rows on which the trainer's routers agree with the engine's
    at every token and layer (up to the last scored token) need no forward for it; the rest take one extra no-grad
    forward. In fp32 on the CPU rows agree; in bf16 most long rows differ somewhere: up to a full forward."""
    max_compute_tokens: int | None = None
    """Stop (with a checkpoint) before the first step that would start with compute/total_tokens (prefilled +
    decoded + trained tokens, counted by the run) at or past this budget; None: trainer.max_steps alone. Prefill
    counts every request's prompt, although the engine runs a group's identical prompts once: the budget measures
    the method, not an engine optimisation."""
    codesign: CodesignConfig = field(default_factory=CodesignConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)

    def __post_init__(self) -> None:
        positive = ("prompts_per_step", "minibatches", "epochs", "max_prompt_tokens",
                    "max_new_tokens", "diagnostic_interval")
        for key in positive:
            _require(getattr(self, key) >= 1, f"rl.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.group_size >= 2, "rl.group_size", f"must be >= 2 (advantages compare a group), got {self.group_size}")
        _require(self.temperature > 0, "rl.temperature", f"must be > 0 (RL needs sampled rollouts), got {self.temperature}")
        _require(0 < self.top_p <= 1, "rl.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.advantage in ADVANTAGE_KINDS, "rl.advantage", f"must be one of {ADVANTAGE_KINDS}, got {self.advantage!r}")
        _require(self.trust_region in TRUST_REGIONS, "rl.trust_region",
                 f"must be one of {TRUST_REGIONS}, got {self.trust_region!r}")
        _require(self.loss_aggregation in AGGREGATION_KINDS, "rl.loss_aggregation",
                 f"must be one of {AGGREGATION_KINDS}, got {self.loss_aggregation!r}")
        _require(self.max_refills >= 0, "rl.max_refills", f"must be >= 0, got {self.max_refills}")
        _require(self.delta > 0, "rl.delta", f"must be > 0, got {self.delta}")
        _require(0 <= self.clip_low < 1, "rl.clip_low", f"must be in [0, 1), got {self.clip_low}")
        _require(self.clip_high >= 0, "rl.clip_high", f"must be >= 0, got {self.clip_high}")
        _require(self.tis_cap >= 0, "rl.tis_cap", f"must be >= 0 (0: off), got {self.tis_cap}")
        _require(self.kl_coef >= 0, "rl.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _require(self.max_batch_size is None or self.max_batch_size >= 1, "rl.max_batch_size", "must be >= 1")
        _require(self.max_compute_tokens is None or self.max_compute_tokens >= 1, "rl.max_compute_tokens",
                 f"must be >= 1 or null, got {self.max_compute_tokens}")
        if not self.environments:
            _require_data(self.data, "rl.data")
        names = [env.name for env in self.environments]
        _require(len(set(names)) == len(names), "rl.environments", f"names must be unique, got {names}")
        datas = [env.data for env in self.environments] or [self.data]
        if any(d.startswith("behaviour:") for d in datas):
            _require(self.reward_model.path is not None, "rl.reward_model.path",
                     "behaviour: data needs a reward model directory")
        _require(datas.count("rlve") <= 1, "rl.environments", "at most one environment can be the rlve curriculum")
        if self.filter.pass_rate is not None:
            _require("rlve" not in datas, "rl.filter.pass_rate",
                     "the rlve curriculum adapts to the policy itself; filtering its problems is not supported")

    def environment_list(self) -> list[EnvironmentConfig]:
        """The configured environments; a single `data` is one environment named after its form."""
        if self.environments:
            return list(self.environments)
        prefix, _, rest = self.data.partition(":")
        name = rest if prefix == "rg" else prefix if rest else "jsonl" if self.data.endswith(".jsonl") else self.data
        return [EnvironmentConfig(name=name, data=self.data)]
