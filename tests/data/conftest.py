"""Fixtures for the data tests: a word-level chat tokenizer, so token counts and cut points can be computed by
hand (one token per word or punctuation run, one per special token; newlines produce no token)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from zaya_train.data.tokenizer import wrap_tokenizer

WORDS = [
    "what",
    "is",
    "two",
    "it",
    "one",
    "add",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "x",
    "y",
    "z",
    "hello",
    "world",
]


@pytest.fixture(scope="session")
def word_tokenizer():
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return wrap_tokenizer(backend)
