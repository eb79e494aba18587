"""The reward-model scorer against the HF model called by hand: `pytest tests/rewards/test_reward_model.py`
(offline, tiny randomly initialised models, a few seconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForSequenceClassification

from zaya_train.data.tokenizer import train_bpe
from zaya_train.rewards.reward_model import RewardModelScorer, write_tiny_reward_model

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today?",
    "blue green red",
] * 4
PAIRS = [
    ("Name a colour.", "Blue."),
    ("What is the capital of France?", "Paris is the capital of France, on the river Seine."),
    ("hi", "hello there"),
    ("Tell me about the quick brown fox and the lazy dog, please.", "It jumps."),
    ("x", "a much longer answer that keeps going over the lazy dog and the quick brown fox for a long while"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(texts=TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def rm_dir(tokenizer, tmp_path_factory):
    return write_tiny_reward_model(tmp_path_factory.mktemp("rm"), tokenizer, seed=0)


def chat_ids(tokenizer, prompt: str, completion: str) -> list[int]:
    """The chat format of zaya_train.data.tokenizer, written out by hand."""
    text = f"<|bos|><|user|>\n{prompt}<|eos|><|assistant|>\n{completion}<|eos|>"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def logits_by_hand(model_dir, ids: list[int]) -> torch.Tensor:
    """The head applied to the last token's hidden state, without HF's pooling or padding logic."""
    model = LlamaForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hidden_D = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return model.score(hidden_D)


def test_score_matches_the_model_called_by_hand(rm_dir, tokenizer):
    scorer = RewardModelScorer(rm_dir)
    for prompt, completion in PAIRS[:2]:
        expected = logits_by_hand(rm_dir, chat_ids(tokenizer, prompt, completion)).item()
        assert scorer.score_many([prompt], [completion])[0] == pytest.approx(expected, abs=1e-5)


def test_batched_with_padding_equals_one_by_one(rm_dir):
    scorer = RewardModelScorer(rm_dir, batch_size=3)
    lengths = {len(scorer.encode(p, c)) for p, c in PAIRS}
    assert len(lengths) == len(PAIRS)  # all lengths differ, so every batch is padded
    prompts, completions = zip(*PAIRS)
    batched = scorer.score_many(prompts, completions)
    alone = [scorer.score_many([p], [c])[0] for p, c in PAIRS]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert max(batched) - min(batched) > 0.05  # the inputs really are told apart
    assert scorer.score_many([], []) == []


def test_no_grad_and_no_training_mode(rm_dir):
    scorer = RewardModelScorer(rm_dir)
    assert not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())


def test_two_label_head_scores_logit1_minus_logit0(tokenizer, tmp_path):
    model_dir = write_tiny_reward_model(tmp_path / "rm2", tokenizer, seed=1, num_labels=2)
    scorer = RewardModelScorer(model_dir, batch_size=2)
    prompts, completions = zip(*PAIRS[:3])
    expected = []
    for p, c in PAIRS[:3]:
        logits = logits_by_hand(model_dir, chat_ids(tokenizer, p, c))
        expected.append((logits[1] - logits[0]).item())
    assert scorer.score_many(prompts, completions) == pytest.approx(expected, abs=1e-5)


def test_without_chat_template_the_text_is_prompt_then_completion(tokenizer, tmp_path):
    plain = train_bpe(texts=TEXTS, vocab_size=300)
    plain.chat_template = None
    model_dir = write_tiny_reward_model(tmp_path / "plain", plain)
    prompt, completion = PAIRS[1]
    expected = logits_by_hand(model_dir, plain(prompt + completion)["input_ids"]).item()
    assert RewardModelScorer(model_dir).score_many([prompt], [completion]) == pytest.approx(
        [expected], abs=1e-5
    )


def test_long_pairs_keep_the_end_of_the_completion(rm_dir, tokenizer):
    scorer = RewardModelScorer(rm_dir, max_length=12)
    prompt, completion = PAIRS[4]
    tail = chat_ids(tokenizer, prompt, completion)[-12:]
    assert scorer.encode(prompt, completion) == tail
    expected = logits_by_hand(rm_dir, tail).item()
    assert scorer.score_many([prompt], [completion])[0] == pytest.approx(expected, abs=1e-5)


def test_missing_or_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        RewardModelScorer(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a local directory"):
        RewardModelScorer("some-org/some-reward-model")  # a hub name is never downloaded
    with pytest.raises(ValueError, match="no config.json"):
        RewardModelScorer(tmp_path)


def test_bad_arguments(rm_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="num_labels=3"):
        RewardModelScorer(write_tiny_reward_model(tmp_path / "rm3", tokenizer, num_labels=3))
    with pytest.raises(ValueError, match="dtype='fp8'"):
        RewardModelScorer(rm_dir, dtype="fp8")
    with pytest.raises(ValueError, match="batch_size=0"):
        RewardModelScorer(rm_dir, batch_size=0)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        RewardModelScorer(rm_dir).score_many(["a", "b"], ["c"])


def test_bfloat16_is_close_to_float32(rm_dir):
    prompts, completions = zip(*PAIRS)
    full = RewardModelScorer(rm_dir).score_many(prompts, completions)
    half = RewardModelScorer(rm_dir, dtype=torch.bfloat16).score_many(prompts, completions)
    assert half == pytest.approx(full, abs=0.1)


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone(tokenizer, tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = LlamaForSequenceClassification.from_pretrained(
        write_tiny_reward_model(tmp_path / "a", tokenizer, seed=5)
    )
    assert torch.equal(torch.random.get_rng_state(), before)
    b = LlamaForSequenceClassification.from_pretrained(
        write_tiny_reward_model(tmp_path / "b", tokenizer, seed=5)
    )
    c = LlamaForSequenceClassification.from_pretrained(
        write_tiny_reward_model(tmp_path / "c", tokenizer, seed=6)
    )
    assert torch.equal(a.score.weight, b.score.weight)
    assert not torch.equal(a.score.weight, c.score.weight)
    assert a.config.num_labels == 1 and a.config.pad_token_id == tokenizer.pad_token_id
