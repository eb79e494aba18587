"""Scalar rewards from a Hugging Face sequence-classification reward model (ZAYA1 behavioural RL, stage 4).

    from zaya_train.rewards.reward_model import RewardModelScorer, write_tiny_reward_model
    scorer = RewardModelScorer("/models/my-rm", device="cuda", batch_size=16, max_length=4096, dtype="bfloat16")
    scorer.score_many(["Name a colour."], ["Blue."])          # -> [1.73]

Any `AutoModelForSequenceClassification` directory works; it is loaded with `local_files_only=True`. A pair is
formatted with the RM tokenizer's chat template (user = prompt, assistant = completion) when it has one, else as
the plain text prompt + completion. The reward is the logit of a one-label head, or logit[1] - logit[0] for a
two-label (reject, accept) head, i.e. the log-odds of "accept". RM scores are unbounded real numbers, not the
[0, 1] of the verifiers: any gate or penalty mixed with them must be set on the RM's own scale.

Pairs longer than `max_length` lose the start of the prompt (left truncation): the head reads the final token,
which must stay the end of the completion being judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
)

from zaya_train.data.tokenizer import load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModelScorer:
    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        max_length: int = 4096,
        dtype: str | torch.dtype = "float32",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2")
        self.path, self.device = Path(path), torch.device(device)
        self.batch_size, self.max_length = batch_size, max_length
        if not self.path.is_dir():
            raise ValueError(
                f"reward model path={str(path)!r} is not a local directory (hub names are not loaded)"
            )
        if not (self.path / "config.json").is_file():
            raise ValueError(
                f"reward model path={str(path)!r} has no config.json: not a saved model directory"
            )
        self.tokenizer = load_tokenizer(self.path)
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(self.path), local_files_only=True, dtype=_torch_dtype(dtype)
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        if self.model.config.num_labels not in (1, 2):
            raise ValueError(
                f"reward model at {str(path)!r} has num_labels={self.model.config.num_labels}; expected 1 "
                "(a scalar score) or 2 (reject, accept)"
            )
        # The head reads the rightmost token that is not the *model's* pad id, so padding must use that id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = self.model.config.pad_token_id

    def encode(self, prompt: str, completion: str) -> list[int]:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            special = False  # the template already places BOS and the like
        else:
            text, special = prompt + completion, True
        encoded = self.tokenizer(
            text, add_special_tokens=special, truncation=True, max_length=self.max_length
        )
        return encoded["input_ids"]

    def score_many(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One unbounded score per (prompt, completion) pair, in order."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        ids = [self.encode(p, c) for p, c in zip(prompts, completions)]
        # Batching pairs of similar length keeps padding, hence wasted compute, small.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, s in zip(chunk, self._score_batch([ids[i] for i in chunk])):
                scores[i] = s
        return scores

    @torch.inference_mode()
    def _score_batch(self, batch: list[list[int]]) -> list[float]:
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, : len(x)] = 1
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).logits
        return reward_from_logits(logits.float()).tolist()


def reward_from_logits(logits_BL: torch.Tensor) -> torch.Tensor:
    """[batch, num_labels] -> [batch]: the logit itself for one label, logit[1] - logit[0] for two."""
    if logits_BL.shape[-1] == 1:
        return logits_BL[:, 0]
    return logits_BL[:, 1] - logits_BL[:, 0]


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def write_tiny_reward_model(
    out_dir: str | Path,
    tokenizer_dir_or_tokenizer: str | Path | PreTrainedTokenizerBase,
    seed: int = 0,
    num_labels: int = 1,
) -> Path:
    """Save a randomly initialised 2-layer, 32-wide `LlamaForSequenceClassification` and its tokenizer to `out_dir`
    (for tests and toy recipes; its scores mean nothing). The global torch RNG is left untouched."""
    tok = tokenizer_dir_or_tokenizer
    if not isinstance(tok, PreTrainedTokenizerBase):
        tok = load_tokenizer(tok)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        # Wider than the usual 0.02 so scores spread over about a unit and tests can tell inputs apart.
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
