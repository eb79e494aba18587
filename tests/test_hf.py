"""HF checkpoint interop: sharded round trips and strict errors for anything that does not match."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from zaya_train.hf import INDEX_FILE, load_pretrained, save_pretrained
from zaya_train.model import ZayaForCausalLM, preset


@pytest.fixture
def model():
    model = ZayaForCausalLM(preset("nano", num_hidden_layers=2))
    with torch.no_grad():
        for router in model.routers():
            router.balancing_biases.normal_(0, 0.3)
    return model


def test_sharded_export_round_trips_every_tensor(model, tmp_path):
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    back = load_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.lm_head.weight is back.model.embed_tokens.weight
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(hf_model, transformers.ZayaForCausalLM)


def test_bf16_export(model, tmp_path):
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.layers.0.mlp.gate.balancing_biases"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_not_a_zaya_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_pretrained(tmp_path)


def test_no_weights(model, tmp_path):
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="weights.bin"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("change", ["missing", "unexpected", "misshapen"])
def test_tensor_mismatches_are_named(model, tmp_path, change):
    save_pretrained(model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.gate.balancing_biases"
    if change == "missing":
        del tensors[name]
    elif change == "unexpected":
        tensors["model.layers.1.mlp.shared_expert.weight"] = torch.zeros(3)
        name = "model.layers.1.mlp.shared_expert.weight"
    else:
        tensors[name] = torch.zeros(9)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"{change}.*{name}"):
        load_pretrained(tmp_path)


def test_untied_lm_head_present_in_tied_checkpoint_must_equal_embedding(model, tmp_path):
    save_pretrained(model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path)
    load_pretrained(tmp_path)
    tensors["lm_head.weight"] += 1
    save_file(tensors, path)
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_pretrained(tmp_path)
