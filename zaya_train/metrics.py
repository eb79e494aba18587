"""Run metrics: a JSON-lines file in the run directory and, optionally, wandb. Used by training, RL and evaluation.

    from zaya_train.metrics import MetricsSink, WandbConfig
    with MetricsSink(run_dir, WandbConfig(mode="offline"), rank=rank, run_config=cfg) as sink:
        sink.log(step, loss, {"lr": lr, "grad_norm": norm})

`run_dir/metrics.jsonl` gets one object per `log` call, `{"step": ..., "loss": ..., "time": <unix s>, ...}`,
flushed at once so a crash loses nothing that was logged (the file is opened for appending, so a resumed run
continues it). Only rank 0 writes and only rank 0 talks to wandb. Non-finite values are written as JSON's
NaN/Infinity extensions, which Python's `json` and pandas read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from typing_extensions import Self

WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class WandbConfig:
    mode: str = "disabled"
    project: str = "zaya-train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    # Where wandb keeps its files; None puts them in the run directory.
    dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"WandbConfig.mode must be one of {WANDB_MODES}, got {self.mode!r}")


class MetricsSink:
    """Writes `run_dir/metrics.jsonl` and, if `wandb_config.mode != "disabled"`, a wandb run; both on rank 0
    only (other ranks' `log` does nothing). `run_config` (a dict or dataclass) is sent to wandb as its config."""

    def __init__(
        self, run_dir: str | Path, wandb_config: WandbConfig, rank: int = 0, run_config: Any = None
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._wandb_run = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if wandb_config.mode != "disabled":
            import wandb

            wandb_dir = Path(wandb_config.dir) if wandb_config.dir is not None else Path(run_dir)
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(
                project=wandb_config.project,
                entity=wandb_config.entity,
                name=wandb_config.name,
                tags=list(wandb_config.tags),
                config=asdict(run_config) if is_dataclass(run_config) else run_config,
                mode=wandb_config.mode,
                dir=str(wandb_dir),
            )

    def log(self, step: int, loss: float | torch.Tensor, metrics: Mapping[str, Any] | None = None) -> None:
        if self._file is None:
            return
        record = {"step": int(step), "loss": _scalar(loss), "time": time.time()}
        for key, value in (metrics or {}).items():
            if key in record:
                raise ValueError(f"metric name {key!r} is reserved in metrics.jsonl")
            record[key] = _scalar(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(
                {k: v for k, v in record.items() if k not in ("step", "time")}, step=record["step"]
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
