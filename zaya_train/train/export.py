"""Trainer checkpoint -> HF `zaya` checkpoint (config.json + safetensors) with the run's tokenizer beside it.

    zaya-train recipe=export checkpoint=runs/nano/20261129-101500 out=exports/nano
    python -c "from zaya_train.train.export import export_checkpoint; export_checkpoint('runs/x', 'out/')"

The weights are the fp32 master weights, consolidated from every ZeRO partition (any stage); the routers'
balancing biases travel with them. Read the export notes in zaya_train/hf.py about transformers' loader.
"""

from __future__ import annotations

from pathlib import Path

from zaya_train.data import load_tokenizer
from zaya_train.hf import save_pretrained
from zaya_train.loading import model_from_checkpoint, resolve_checkpoint


def export_checkpoint(checkpoint_or_run_dir: str | Path, out: str | Path) -> Path:
    checkpoint = resolve_checkpoint(checkpoint_or_run_dir)
    model = model_from_checkpoint(checkpoint, gradient_checkpointing=False)
    out = save_pretrained(model, out)
    tokenizer_dir = checkpoint.parent.parent / "tokenizer"
    if tokenizer_dir.is_dir():
        load_tokenizer(tokenizer_dir).save_pretrained(out)
    return out
