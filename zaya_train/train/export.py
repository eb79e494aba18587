"""Trainer checkpoint -> HF `zaya` checkpoint (config.json + safetensors) with the run's tokenizer beside it.

    zaya-train recipe=export checkpoint=runs/nano/20261129-101500 out=exports/nano
    python -c "from zaya_train.train.export import export_checkpoint; export_checkpoint('runs/x', 'out/')"

The weights are the fp32 master weights, consolidated from every ZeRO partition (any stage); the routers'
balancing biases travel with them. Read the export notes in zaya_train/hf.py about transformers' loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from zaya_train.hf import save_pretrained
from zaya_train.model import ZayaConfig, ZayaForCausalLM
from zaya_train.train import checkpoint as ckpt


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of a trainer checkpoint, gathered from the ZeRO partitions."""
    state = ckpt.read_trainer_state(checkpoint)
    ds_dir = checkpoint / ckpt.DS_TAG
    module_states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if state["zero_stage"] == 0:
        return {k: v.float() if v.is_floating_point() else v for k, v in module_states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ckpt.DS_TAG)
    for name, buffer in module_states["module"].items():
        if name.endswith("balancing_biases"):
            weights[name] = buffer.float()
    return weights


def model_from_checkpoint(checkpoint: Path) -> ZayaForCausalLM:
    state = ckpt.read_trainer_state(checkpoint)
    config = ZayaConfig(**state["model_config"])
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    weights = consolidated_state_dict(checkpoint)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.materialize_rope("cpu")
    return model


def load_model_and_tokenizer(path: str | Path) -> tuple[ZayaForCausalLM, Any]:
    """The model and tokenizer of an HF `zaya` directory, a trainer checkpoint or a run directory (its latest)."""
    from zaya_train.data import load_tokenizer
    from zaya_train.hf import load_pretrained

    path = Path(path)
    if (path / "config.json").is_file():
        return load_pretrained(path), load_tokenizer(path)
    checkpoint = ckpt.resolve_checkpoint(path)
    return model_from_checkpoint(checkpoint), load_tokenizer(checkpoint.parent.parent / "tokenizer")


def export_checkpoint(checkpoint_or_run_dir: str | Path, out: str | Path) -> Path:
    checkpoint = ckpt.resolve_checkpoint(checkpoint_or_run_dir)
    model = model_from_checkpoint(checkpoint)
    model.config = dataclasses.replace(model.config, gradient_checkpointing=False)
    out = save_pretrained(model, out)
    tokenizer_dir = checkpoint.parent.parent / "tokenizer"
    if tokenizer_dir.is_dir():
        from zaya_train.data import load_tokenizer

        load_tokenizer(tokenizer_dir).save_pretrained(out)
    return out
