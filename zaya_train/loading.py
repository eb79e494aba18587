"""A model (and its tokenizer) from wherever one is kept: an HF `zaya` directory, a trainer checkpoint, or a run
directory (meaning its latest checkpoint).

    from zaya_train.loading import load_model, load_model_and_tokenizer, resolve_checkpoint
    model, tokenizer = load_model_and_tokenizer("runs/nano/20261201-101500")
    model = load_model("exports/nano", gradient_checkpointing=True)

This module sits below `train/`, `rollout/` and `rsa/`: the trainer writes checkpoints in the layout described
here (zaya_train/train/checkpoint.py), and everything that only reads them imports this module, never the
training package.

    run_dir/
      tokenizer/                the run's tokenizer
      checkpoints/
        step_00000200/          a complete checkpoint: deepspeed/ and trainer_state.json (+ loader, RNG, balancer)
        latest                  the name of the newest complete checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from zaya_train.hf import load_pretrained
from zaya_train.model import ZayaConfig, ZayaForCausalLM
from zaya_train.model.state import model_from_state_dict

LATEST = "latest"
PREFIX = "step_"
DS_TAG = "deepspeed"
TRAINER_STATE = "trainer_state.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file() and (path / DS_TAG).is_dir()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step directory."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    complete = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and is_complete(p))
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (meaning its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_complete(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a complete trainer checkpoint nor a run directory with one")
    return found


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def check_model_source(path: str | Path) -> None:
    """Raises ValueError, saying what was found, unless `path` is something `load_model` reads."""
    path = Path(path)
    if (path / "config.json").is_file():
        return
    try:
        resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise ValueError(str(err) if not path.exists() else f"{err}, nor an HF zaya directory (no config.json)") from err


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of a trainer checkpoint, gathered from the ZeRO partitions (any stage)."""
    state = read_trainer_state(checkpoint)
    ds_dir = checkpoint / DS_TAG
    module_states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if state["zero_stage"] == 0:
        return {k: v.float() if v.is_floating_point() else v for k, v in module_states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    for name, buffer in module_states["module"].items():
        if name.endswith("balancing_biases"):
            weights[name] = buffer.float()
    return weights


def model_from_checkpoint(checkpoint: Path, **config_overrides: Any) -> ZayaForCausalLM:
    config = ZayaConfig(**{**read_trainer_state(checkpoint)["model_config"], **config_overrides})
    return model_from_state_dict(config, consolidated_state_dict(checkpoint), source=str(checkpoint))


def load_model(path: str | Path, **config_overrides: Any) -> ZayaForCausalLM:
    """The fp32 CPU model of an HF `zaya` directory, a trainer checkpoint or a run directory (its latest).
    `config_overrides` set training-only fields such as gradient_checkpointing."""
    path = Path(path)
    if (path / "config.json").is_file():
        return load_pretrained(path, **config_overrides)
    return model_from_checkpoint(resolve_checkpoint(path), **config_overrides)


def tokenizer_dir(path: str | Path) -> Path:
    """Where the tokenizer of a model source lives: beside an HF directory's weights, or in the run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    return resolve_checkpoint(path).parent.parent / "tokenizer"


def load_model_and_tokenizer(path: str | Path) -> tuple[ZayaForCausalLM, Any]:
    from zaya_train.data import load_tokenizer

    return load_model(path), load_tokenizer(tokenizer_dir(path))
