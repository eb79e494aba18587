"""Metrics: a JSON-lines file in the run directory, optional wandb, and FLOPs accounting for MFU.

    from zaya_train.train.metrics import MetricsConfig, MetricsSink, model_flops_per_token, peak_flops, throughput
    flops = model_flops_per_token(model_config, seq_len=4096)
    peak = peak_flops(device, override=metrics_config.peak_flops)   # None on a CPU: MFU is then not reported
    with MetricsSink(run_dir, metrics_config, rank=rank, run_config=resolved_config) as sink:
        ...
        sink.log(step, loss, {"lr": lr, **throughput(tokens, seconds, flops, world_size, peak), **balancer_metrics})

`run_dir/metrics.jsonl` gets one object per `log` call, `{"step": ..., "loss": ..., "time": <unix s>, ...}`,
flushed at once so a crash loses nothing that was logged (the file is opened for appending, so a resumed run
continues it). Only rank 0 writes and only rank 0 talks to wandb. Non-finite values are written as JSON's
NaN/Infinity extensions, which Python's `json` and pandas read.

Model FLOPs per token (forward + backward, the PaLM accounting, Chowdhery et al. 2022 App. B):

    6 * (active + V * D)  +  12 * sum_l (Q * d * ctx_l)

- `active` is `parameter_counts(config)["active"]`: every non-embedding parameter a token uses (attention,
  router, norms, scales, conv kernels, one expert per layer). `V * D` adds the LM head matmul, which costs
  FLOPs even when tied to the embedding; the embedding lookup costs none. Tokens sent to the skip class use no
  expert, so this slightly overstates a run that skips.
- Attention scores and the value mix cost 2 * Q * d * ctx FLOPs each per token and layer in the forward pass
  (Q query heads of dim d), three times that with the backward. `ctx_l` is the sequence length, or the window
  for `hybrid_sliding` layers. By default the full ctx is charged, as in PaLM, torchtitan and nanoGPT, so MFU
  is comparable with theirs; `causal=True` charges the (ctx + 1) / 2 keys a causal query really sees on
  average. Packed rows attend within documents only, so both overstate packed attention work.
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

from zaya_train.model.config import ZayaConfig
from zaya_train.model.counts import parameter_counts

WANDB_MODES = ("disabled", "offline", "online")

# Dense bf16 peak FLOP/s per device, matched by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS: dict[str, float] = {
    "MI300X": 1307.4e12,
    "H100 80GB HBM3": 989e12,  # the SXM part's device name
    "H100 SXM": 989e12,
    "H200": 989e12,  # same tensor cores as the H100 SXM
}


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


@dataclass
class MetricsConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Peak FLOP/s of one device for MFU; None looks the device up in PEAK_BF16_FLOPS.
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"MetricsConfig.peak_flops must be > 0, got {self.peak_flops!r}")


class MetricsSink:
    """Writes `run_dir/metrics.jsonl` and, if `config.wandb.mode != "disabled"`, a wandb run; both on rank 0
    only (other ranks' `log` does nothing). `run_config` (a dict or dataclass) is sent to wandb as its config."""

    def __init__(
        self, run_dir: str | Path, config: MetricsConfig, rank: int = 0, run_config: Any = None
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._wandb_run = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        wandb_config = config.wandb
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


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU


def model_flops_per_token(config: ZayaConfig, seq_len: int, causal: bool = False) -> float:
    """Training (forward + backward) FLOPs per token at row length `seq_len`; the formula is in the module doc."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    dense = 6 * (parameter_counts(config)["active"] + config.vocab_size * config.hidden_size)
    attention = 0.0
    for layer_type in config.layer_types:
        ctx = min(seq_len, config.sliding_window) if layer_type == "hybrid_sliding" else seq_len
        keys = (ctx + 1) / 2 if causal else ctx
        attention += 12 * config.query_dim * keys
    return float(dense + attention)


def peak_flops(device: torch.device | str | None = None, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` if given, else the PEAK_BF16_FLOPS entry for the device name;
    None on a CPU or an unknown accelerator (MFU is then not reported)."""
    if override is not None:
        return float(override)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def throughput(
    tokens: int, seconds: float, flops_per_token: float, num_devices: int, peak_flops_per_device: float | None
) -> dict[str, float]:
    """Throughput of `tokens` trained (all ranks together) in `seconds`: tokens/s, per-device tokens/s and
    model TFLOP/s, and `mfu` (the fraction of peak) when a peak is known."""
    if not seconds > 0 or num_devices <= 0:
        raise ValueError(
            f"throughput needs seconds > 0 and num_devices > 0, got {seconds!r} and {num_devices!r}"
        )
    tokens_per_s = tokens / seconds
    flops_per_device = tokens_per_s * flops_per_token / num_devices
    out = {
        "throughput/tokens_per_s": tokens_per_s,
        "throughput/tokens_per_s_per_device": tokens_per_s / num_devices,
        "throughput/tflops_per_device": flops_per_device / 1e12,
    }
    if peak_flops_per_device is not None:
        out["throughput/mfu"] = flops_per_device / peak_flops_per_device
    return out
