"""`CascadeConfig`: the toy budgets of `recipe=nano_cascade` (`cascade.*`) and its stage names.

    zaya-train recipe=nano_cascade cascade.rl_steps=4 "cascade.overrides.stage2_rlve=['rl.curriculum.up_threshold=0.5']"
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Stage name -> the recipe it runs (pretrain: the toy model the RL stages start from).
CASCADE_STAGES = {
    "pretrain": "pretrain",
    "stage1_warmup": "zaya1_rl_stage1_warmup",
    "stage2_rlve": "zaya1_rl_stage2_rlve",
    "stage3a_math_code_ttc": "zaya1_rl_stage3a_math_code_ttc",
    "stage3b_math_code_ttc": "zaya1_rl_stage3b_math_code_ttc",
    "stage4_behavioral": "zaya1_rl_stage4_behavioral",
}


class CascadeConfigError(ValueError):
    """A bad `cascade.*` value; the message starts with the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise CascadeConfigError(f"{key}: {message}")


@dataclass
class CascadeConfig:
    stages: list[str] = field(default_factory=lambda: list(CASCADE_STAGES))
    """Which stages run, in cascade order; each RL stage starts from the one before it."""
    pretrain_steps: int = 60
    """Steps of the toy model's pretraining on the stages' own text (a byte-level BPE trained on it)."""
    rl_steps: int = 2
    """Steps of each RL stage."""
    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 24
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per stage, `key=value` overrides of its recipe (quoted inside the list, as Hydra parses them)."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in CASCADE_STAGES]
        _require(not unknown, "cascade.stages", f"unknown stages {unknown}, expected some of {list(CASCADE_STAGES)}")
        order = [s for s in CASCADE_STAGES if s in self.stages]
        _require(list(self.stages) == order and len(set(self.stages)) == len(self.stages), "cascade.stages",
                 f"must be distinct and in cascade order {list(CASCADE_STAGES)}, got {list(self.stages)}")
        for key in ("pretrain_steps", "rl_steps", "prompts_per_step", "max_new_tokens"):
            _require(getattr(self, key) >= 1, f"cascade.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.group_size >= 4, "cascade.group_size", f"must be >= 4 (rsa.c of the aggregation prompts), "
                 f"got {self.group_size}")
        for stage, values in self.overrides.items():
            _require(stage in CASCADE_STAGES, "cascade.overrides", f"unknown stage {stage!r}")
            _require(all("=" in v for v in values), f"cascade.overrides.{stage}",
                     f"expected key=value overrides, got {list(values)}")
