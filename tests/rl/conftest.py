"""A random nano policy saved as an HF directory with the nano task's character tokenizer, for RL tests."""

import pytest
import torch

from zaya_train.data import NANO_CHARS, char_tokenizer
from zaya_train.hf import save_pretrained
from zaya_train.model import ZayaForCausalLM, preset


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    tokenizer = char_tokenizer(NANO_CHARS)
    torch.manual_seed(0)
    config = preset("nano", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    save_pretrained(ZayaForCausalLM(config), path)
    tokenizer.save_pretrained(path)
    return path
