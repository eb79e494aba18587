"""Learning-rate schedules as pure functions of the optimizer step, and their `LambdaLR` wrapper.

    from zaya_train.train.schedule import ScheduleConfig, build_scheduler, lr_factor
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="wsd", warmup_steps=100, total_steps=10_000))
    for step in range(total_steps):
        ...; optimizer.step(); scheduler.step()

A schedule returns a factor that multiplies every param group's own peak lr (so Muon and AdamW groups with
different lrs share one shape). Step `s` is 0-based: `lr_factor(config, s)` is the factor used by the s-th
optimizer step, which is what `LambdaLR` applies after `s` calls of `scheduler.step()`.

- `cosine`: linear warmup, then cosine decay from 1 to `min_lr_ratio` at `total_steps`.
- `wsd` (warmup-stable-decay): linear warmup, constant 1, then a decay over the last `decay_fraction` of
  `total_steps` down to `min_lr_ratio`, shaped `linear`, `cosine` or `1-sqrt` (the shape Hagele et al. 2024,
  arXiv 2405.18392, found best for WSD cool-downs).
- `constant`: linear warmup, then 1.

Warmup is (s + 1) / warmup_steps, so the first step already moves the weights and step warmup_steps - 1 reaches
the peak. Past `total_steps` the factor stays at its final value.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"ScheduleConfig.name must be one of {SCHEDULES}, got {self.name!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(
                f"ScheduleConfig.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}"
            )
        for key in ("warmup_steps", "total_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ScheduleConfig.{key} must be a non-negative integer, got {value!r}")
        if self.total_steps == 0:
            raise ValueError("ScheduleConfig.total_steps must be positive, got 0")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"ScheduleConfig.warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"ScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"ScheduleConfig.decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if self.name == "wsd" and self.decay_start < self.warmup_steps:
            raise ValueError(
                f"ScheduleConfig.decay_fraction={self.decay_fraction} starts the decay at step {self.decay_start}, "
                f"inside the {self.warmup_steps} warmup steps"
            )

    @property
    def decay_start(self) -> int:
        """First step of the WSD decay phase."""
        return self.total_steps - round(self.decay_fraction * self.total_steps)


def warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd_factor(
    step: int, warmup_steps: int, total_steps: int, decay_start: int, min_lr_ratio: float, decay_shape: str
) -> float:
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    if decay_shape == "linear":
        remaining = 1 - progress
    elif decay_shape == "cosine":
        remaining = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        remaining = 1 - math.sqrt(progress)
    return min_lr_ratio + (1 - min_lr_ratio) * remaining


def lr_factor(config: ScheduleConfig, step: int) -> float:
    """The lr multiplier of 0-based optimizer step `step`."""
    if config.name == "cosine":
        return cosine_factor(step, config.warmup_steps, config.total_steps, config.min_lr_ratio)
    if config.name == "wsd":
        return wsd_factor(
            step,
            config.warmup_steps,
            config.total_steps,
            config.decay_start,
            config.min_lr_ratio,
            config.decay_shape,
        )
    return warmup_factor(step, config.warmup_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    # functools.partial of a module-level function (not a lambda) keeps the scheduler picklable for checkpoints.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config))
