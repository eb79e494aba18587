"""Atomic, resumable checkpoints under `run_dir/checkpoints/`.

    run_dir/checkpoints/
      step_00000200/            a complete checkpoint
        deepspeed/              DeepSpeed state (module, optimizer partitions, scheduler)
        trainer_state.json      step, counters, world size, ZeRO stage, the resolved config
        data_state.json         the loader position (global windows consumed)
        balancer.pt             expert-bias balancer (biases + its AdamW state)
        rng/rank_00000.pt       every rank's RNG states
      latest                    the name of the newest complete checkpoint (written last)

The layout and its readers live in zaya_train/loading.py, below this package, so that the rollout engine and the
evaluation harness read checkpoints without importing the trainer. A checkpoint is written into `.tmp-step_*`
and renamed into place only when every rank has finished writing, then `latest` is replaced atomically; a
process killed at any moment leaves the previous checkpoint whole and `latest` pointing at it. The newest `keep_last` checkpoints are kept. Resuming at another world size converts
the DeepSpeed state to a universal checkpoint once (`universal/` inside the checkpoint) and loads that.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from zaya_train.loading import DS_TAG, LATEST, PREFIX, TRAINER_STATE, checkpoints_dir, read_trainer_state

UNIVERSAL_TAG = "universal"


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_json_atomic(path: Path, payload: Any) -> None:
    _write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    engine,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any],
    balancer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoints_dir(run_dir)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a write that was killed earlier
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(balancer_state, tmp / "balancer.pt")
        _write_json_atomic(tmp / "data_state.json", data_state)
        _write_json_atomic(tmp / TRAINER_STATE, trainer_state)
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, step_name(step))
        _prune(root, keep_last)
    _barrier()
    return final


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def ensure_universal(checkpoint: Path) -> None:
    """Converts the DeepSpeed state to a universal checkpoint (world-size independent) once; collective."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    target = checkpoint / UNIVERSAL_TAG
    if rank == 0 and not target.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = checkpoint / f".tmp-{UNIVERSAL_TAG}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = _UniversalArgs(input_folder=str(checkpoint / DS_TAG), output_folder=str(tmp))
        ds_to_universal(args)
        os.replace(tmp, target)
    _barrier()


class _UniversalArgs:
    """The argparse namespace `deepspeed.checkpoint.ds_to_universal.main` expects."""

    def __init__(self, input_folder: str, output_folder: str) -> None:
        self.input_folder = input_folder
        self.output_folder = output_folder
        self.num_extract_workers = 1
        self.num_merge_workers = 1
        self.keep_temp_folder = False
        self.strict = True
        self.inject_missing_state = True


def load_checkpoint(checkpoint: Path, engine, universal: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Loads the DeepSpeed state into `engine` and this rank's RNG; returns (trainer, data, balancer) states."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = UNIVERSAL_TAG if universal else DS_TAG
    load_path, _ = engine.load_checkpoint(str(checkpoint), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint / tag}")
    rng_file = checkpoint / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    trainer_state = read_trainer_state(checkpoint)
    data_state = json.loads((checkpoint / "data_state.json").read_text())
    balancer_state = torch.load(checkpoint / "balancer.pt", weights_only=False)
    return trainer_state, data_state, balancer_state
