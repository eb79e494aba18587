"""Builds transformers' own ZayaForCausalLM as the independent reference for our model."""

import torch
import transformers

from zaya_train.hf import transformers_config
from zaya_train.model import ZayaConfig, ZayaForCausalLM


@torch.no_grad()
def randomized_hf_model(config: ZayaConfig, std: float = 0.3, bias_std: float = 0.2) -> transformers.ZayaForCausalLM:
    """An HF model with every parameter random (HF's init leaves `temp` at 0, which would hide attention bugs)
    and random balancing biases, skip class included."""
    model = transformers.ZayaForCausalLM(transformers_config(config)).eval()
    for param in model.parameters():
        param.normal_(0.0, std)
    for name, buf in model.named_buffers():
        if name.endswith("balancing_biases"):
            buf.normal_(0.0, bias_std)
    return model


def ours_from_hf(config: ZayaConfig, hf_model: transformers.ZayaForCausalLM) -> ZayaForCausalLM:
    model = ZayaForCausalLM(config).eval()
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model
