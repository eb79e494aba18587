"""`ExperimentConfig`: the main job's budgets (`experiment.*`), and its stage names.

    zaya-train experiment.rl_compute_tokens=1000000 experiment.eval_problems=100
    zaya-train "experiment.overrides.codesign_rl=['rl.codesign.share=0.25','optim.lr=1e-4']"

Each stage runs its own recipe (`nano_pretrain`, `warmstart`, `rl`, `eval_rsa`) with these budgets; any other key
of a stage's recipe is set through `experiment.overrides.<stage>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zaya_train.rl.algorithms import AGGREGATION_KINDS

STAGES = ("pretrain", "warmstart", "plain_rl", "codesign_rl", "eval")
ARMS = ("plain_rl", "codesign_rl")
EVAL_SPLITS = ("test", "validation")


class ExperimentConfigError(ValueError):
    """A bad `experiment.*`, `stages` or `seeds` value; the message starts with the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ExperimentConfigError(f"{key}: {message}")


@dataclass
class StageOverrides:
    """`key=value` overrides of each stage's recipe, each quoted inside the list (Hydra's grammar):
    `"experiment.overrides.codesign_rl=['rl.codesign.share=0.25','optim.lr=1e-4']"`."""

    pretrain: list[str] = field(default_factory=list)
    """Both pretraining runs (recipe=nano_pretrain)."""
    warmstart: list[str] = field(default_factory=list)
    plain_rl: list[str] = field(default_factory=list)
    codesign_rl: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stage in STAGES:
            values = list(getattr(self, stage))
            _require(all("=" in v for v in values), f"experiment.overrides.{stage}",
                     f"expected key=value overrides, got {values}")

    def of(self, stage: str) -> list[str]:
        return list(getattr(self, stage))


@dataclass
class ExperimentConfig:
    pretrain_steps: int = 500
    """Pretraining steps (batch 64) at the nano_pretrain recipe's lr."""
    anneal_steps: int = 150
    """A second pretraining run from the first, on fresh problems at `anneal_lr` (0: none); its output is the base."""
    anneal_lr: float = 1.0e-3
    warmstart_steps: int = 150
    """Aggregation warm-start steps (recipe=warmstart) from the base."""
    warmstart_pool_problems: int = 608
    """Problems whose rsa.n base samples form the warm start's candidate pool."""
    rl_compute_tokens: int = 2_000_000
    """Each RL arm stops when its prefilled + decoded + trained tokens reach this budget (equal compute)."""
    rl_max_steps: int = 10_000
    """A cap on RL steps behind the compute budget."""
    rl_lr: float = 3.0e-5
    """Both arms' peak lr. rl=nano's 1e-4 lowered this base's round-0 accuracy in both arms (co-design: -11
    points); 3e-5 was chosen on the validation split (README, "Levers")."""
    rl_loss_aggregation: str = "sequence_mean"
    """Both arms' loss normalisation (rl.loss_aggregation). Per-sequence means (GRPO's) weigh a 5-token
    aggregation answer like a 60-token solution; chosen over token_mean on the validation split."""
    plain_problems_per_step: int = 16
    """Problems per step of the plain arm (G samples each)."""
    codesign_problems_per_step: int = 8
    """Plain problems per step of the co-design arm; `codesign_share` of its sequences are aggregation outputs."""
    codesign_share: float = 0.5
    codesign_rounds: int = 2
    eval_problems: int = 200
    """Held-out problems of every Markovian RSA evaluation (at most 200: the held-out set)."""
    eval_rounds: int = 3
    """T: aggregation rounds evaluated after round 0."""
    eval_split: str = "test"
    """test: the 200 held-out problems; validation: 200 other problems, for choosing settings (then run test once)."""
    overrides: StageOverrides = field(default_factory=lambda: StageOverrides())
    """Extra `key=value` overrides per stage."""

    def __post_init__(self) -> None:
        for key in ("pretrain_steps", "warmstart_steps", "warmstart_pool_problems", "rl_compute_tokens",
                    "rl_max_steps", "plain_problems_per_step", "codesign_problems_per_step", "eval_problems"):
            _require(getattr(self, key) >= 1, f"experiment.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.anneal_steps >= 0, "experiment.anneal_steps", f"must be >= 0, got {self.anneal_steps}")
        for key in ("anneal_lr", "rl_lr"):
            _require(getattr(self, key) > 0, f"experiment.{key}", f"must be > 0, got {getattr(self, key)}")
        _require(0 < self.codesign_share < 1, "experiment.codesign_share",
                 f"must be in (0, 1) (a share of plain and of aggregation prompts), got {self.codesign_share}")
        _require(self.rl_loss_aggregation in AGGREGATION_KINDS, "experiment.rl_loss_aggregation",
                 f"must be one of {AGGREGATION_KINDS}, got {self.rl_loss_aggregation!r}")
        _require(self.codesign_rounds >= 1, "experiment.codesign_rounds", f"must be >= 1, got {self.codesign_rounds}")
        _require(self.eval_problems <= 200, "experiment.eval_problems",
                 f"the nano task holds out 200 problems, got {self.eval_problems}")
        _require(self.eval_rounds >= 0, "experiment.eval_rounds", f"must be >= 0, got {self.eval_rounds}")
        _require(self.eval_split in EVAL_SPLITS, "experiment.eval_split",
                 f"must be one of {EVAL_SPLITS}, got {self.eval_split!r}")


def check_stages(stages: list[str]) -> list[str]:
    """`stages` in the main job's order; raises ExperimentConfigError for an unknown name or a repeat."""
    unknown = [s for s in stages if s not in STAGES]
    _require(not unknown, "stages", f"unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    _require(len(set(stages)) == len(stages), "stages", f"a stage is listed twice: {stages}")
    _require(bool(stages), "stages", "is empty; expected a subset of " + str(list(STAGES)))
    return [s for s in STAGES if s in stages]


def check_seeds(seeds: list[int]) -> list[int]:
    _require(bool(seeds), "seeds", "is empty")
    _require(len(set(seeds)) == len(seeds), "seeds", f"a seed is listed twice: {seeds}")
    _require(all(s >= 0 for s in seeds), "seeds", f"must be non-negative, got {seeds}")
    return list(seeds)
