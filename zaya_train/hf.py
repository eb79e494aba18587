"""Hugging Face `zaya` checkpoints in and out: config.json + safetensors (sharded with an index when large).

    from zaya_train.hf import load_pretrained, save_pretrained
    model = load_pretrained("path/to/ZAYA1-8B")            # HF directory -> our model
    save_pretrained(model, "out/")                          # our model -> transformers.AutoModelForCausalLM

Parameter names are HF's own, so the mapping is the identity; what this module adds is strictness. Every
tensor is checked: a missing, unexpected or misshapen tensor is an error naming it, never a silent drop.
The routers' balancing biases (buffers) are written and read like weights.

Beware (transformers 5.23/5.24): `ZayaForCausalLM.from_pretrained` re-runs its weight init on the routers
after loading and resets every router's last balancing bias (the skip class) to -1, whatever the file holds.
Our `load_pretrained` keeps the file's values; after loading one of our exports in transformers, restore the
biases from the file if the skip bias was trained (see README, "Export").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zaya_train.model import ZayaConfig, ZayaForCausalLM
from zaya_train.model.state import model_from_state_dict

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def transformers_config(config: ZayaConfig):
    """The `transformers.ZayaConfig` equal to ours (training-only fields dropped)."""
    import transformers

    fields = {k: v for k, v in config.to_hf_dict().items() if k not in ("model_type", "architectures")}
    hf_config = transformers.ZayaConfig(**fields)
    hf_config.architectures = ["ZayaForCausalLM"]
    return hf_config


def export_state_dict(model: ZayaForCausalLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def save_pretrained(
    model: ZayaForCausalLM, path: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None
) -> Path:
    """Writes an HF `zaya` checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads natively.

    `dtype` casts floating-point weights (the balancing biases stay fp32). Returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = transformers_config(model.config)
    state = export_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("balancing_biases") else v for k, v in state.items()}
    hf_config.dtype = str(next(iter(t for k, t in state.items() if k.endswith(".weight"))).dtype).removeprefix("torch.")
    hf_config.save_pretrained(path)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.cpu()
        shard_bytes += size
    for stale in list(path.glob("model*.safetensors")) + list(path.glob(INDEX_FILE)):
        stale.unlink()
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata=metadata)
        return path
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / filename, metadata=metadata)
        weight_map.update({name: filename for name in shard})
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def read_config(path: str | Path) -> ZayaConfig:
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if not config_file.is_file():
        raise ValueError(f"{path} is not a zaya checkpoint: it has no config.json")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "zaya":
        raise ValueError(f"{path} is not a zaya checkpoint: config.json has model_type {hf.get('model_type')!r}")
    return ZayaConfig.from_hf_dict(hf)


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        files = sorted({path / name for name in index["weight_map"].values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{path}: shards named in {INDEX_FILE} are missing: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
    raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found or 'no weight files'})")


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **config_overrides
) -> ZayaForCausalLM:
    """Reads an HF `zaya` checkpoint directory (sharded or not) into our model, keeping every tensor as stored
    (balancing biases included). `config_overrides` set training-only fields such as gradient_checkpointing."""
    path = Path(path)
    config = read_config(path)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    config.validate()
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith("balancing_biases"):
            return tensor.float()
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    state = {name: cast(name, t) for name, t in tensors.items()}
    return model_from_state_dict(config, state, source=str(path), device=device)
