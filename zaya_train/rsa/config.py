"""`RSAConfig`: the parameters of one Markovian RSA run (names follow the ZAYA1-8B report,
arXiv 2605.05365, §VI).

    from zaya_train.rsa import RSAConfig
    cfg = RSAConfig(n=16, c=4, t=2, beta=16384, tau=4096, final_beta=40960)

Token-id fields are lists (not tuples) so the dataclass can be a Hydra structured config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

VARIANTS = ("markovian", "full", "answer_tails")


@dataclass
class RSAConfig:
    n: int = 16
    """Population size: candidates per problem in every round."""
    c: int = 4
    """Candidates shown in one aggregation prompt (the RSA paper's K). c=1 continues each chain on its own."""
    t: int = 2
    """Aggregation rounds after round 0; t=0 is plain parallel sampling."""
    beta: int = 16384
    """New-token budget of every rollout before the final round (round 0 always uses it)."""
    tau: int = 4096
    """Tail length in tokens carried from a candidate into an aggregation prompt (unused by "full")."""
    final_beta: int | None = None
    """New-token budget of the final aggregation round; None means beta."""
    variant: str = "markovian"
    """"markovian": last tau tokens of each reasoning trace; "full": whole candidates (RSA without a cut);
    "answer_tails": the post-reasoning answer of a finished candidate, its reasoning tail otherwise."""
    reasoning_end_ids: list[int] = field(default_factory=list)
    """Token ids that end the reasoning (e.g. `</think>`, or an answer marker). When set, a candidate's
    reasoning is what precedes their last occurrence and its answer what follows; a candidate without
    them has not finished and is all reasoning. Required by "answer_tails"."""
    truncation_marker_ids: list[int] = field(default_factory=list)
    """Token ids put before a tail that was cut, so the model can tell it starts mid-trace."""
    strip_ids: list[int] = field(default_factory=list)
    """Token ids (e.g. EOS, padding) removed from the end of a candidate before its tail is taken."""
    template: str = "text"
    """Aggregation prompt wording (`zaya_train.rsa.template.build_template`): "text", or "compact" (`|`-separated
    tails, for character vocabularies without letters)."""
    seed: int = 0
    """Seeds the generator and the choice of candidate subsets; same seed, same run."""

    @property
    def final_budget(self) -> int:
        """The last aggregation round's budget: final_beta, or beta when unset. (Resolved here rather than
        written back in __post_init__: as a Hydra schema default, a written-back value would outlive a
        command-line beta.)"""
        return self.beta if self.final_beta is None else self.final_beta

    def stripping(self, token_ids: list[int | None]) -> RSAConfig:
        """This config with `token_ids` (e.g. the tokenizer's EOS; None entries ignored) added to strip_ids: what
        evaluation and RL build prompts with, so a finished candidate's tail never carries its EOS."""
        extra = [t for t in token_ids if t is not None and t not in self.strip_ids]
        return dataclasses.replace(self, strip_ids=[*self.strip_ids, *extra])

    def __post_init__(self) -> None:
        for name in ("n", "c", "beta", "tau", "final_beta"):
            value = getattr(self, name)
            if name == "final_beta" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RSAConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.t, int) or self.t < 0:
            raise ValueError(f"RSAConfig.t must be an int >= 0, got {self.t!r}")
        if self.c > self.n:
            raise ValueError(
                f"RSAConfig.c must be <= n (each prompt holds c distinct candidates), got c={self.c}, n={self.n}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"RSAConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant != "full" and self.tau > self.beta:
            raise ValueError(
                f"RSAConfig.tau must be <= beta (a tail is part of one rollout), got tau={self.tau}, beta={self.beta}"
            )
        if self.template not in ("text", "compact"):
            raise ValueError(f"RSAConfig.template must be 'text' or 'compact', got {self.template!r}")
        if self.variant == "answer_tails" and not self.reasoning_end_ids:
            raise ValueError("RSAConfig.reasoning_end_ids must be set for variant 'answer_tails'")
