"""Batched generation for RL rollouts on the model's native decode cache (see `engine.py` for usage)."""

from zaya_train.rollout.engine import RolloutEngine, RolloutResult

__all__ = ["RolloutEngine", "RolloutResult"]
