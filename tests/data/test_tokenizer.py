"""Tokenizers: BPE training on local files and strings, save/reload round trips through AutoTokenizer, the nano
character vocabulary, the chat template. Run: pytest tests/data/test_tokenizer.py"""

import pytest
from transformers import AutoTokenizer

from zaya_train.data.synthetic import NANO_CHARS
from zaya_train.data.tokenizer import (
    TokenizerConfig,
    build_tokenizer,
    char_tokenizer,
    load_tokenizer,
    train_bpe,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>Add them.</think>4"},
]


def test_bpe_from_files_and_iterator_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50 + "héllo wörld 1234\n" * 20)
    tok = train_bpe(texts=["a tiny extra line of text"] * 10, files=[corpus], vocab_size=320)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "the lazy fox says héllo <think>hmm</think> ✓"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: exact, even for characters never seen in training
    assert ids.count(tok.convert_tokens_to_ids("<think>")) == 1  # markup is one token, not BPE pieces

    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.get_vocab() == tok.get_vocab()
    assert again(text)["input_ids"] == ids
    assert again.decode(ids) == text
    assert again.apply_chat_template(CHAT, tokenize=False) == (
        "<|bos|><|system|>\nBe brief.<|eos|><|user|>\nWhat is 2+2?<|eos|><|assistant|>\n<think>Add them.</think>4<|eos|>"
    )
    assert (
        again.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
        == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    )
    assert again.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|eos|><|assistant|>\n"
    )


def test_char_tokenizer_vocab_and_round_trip(tmp_path):
    tok = char_tokenizer(NANO_CHARS)
    assert len(tok) == 20
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # '0'..'9' -> 3..12, '+'=13, '='=14, ','=15, '|'=16, 'Q'=17, 'A'=18, '_'=19
    assert tok("Q37+82=", add_special_tokens=False)["input_ids"] == [17, 6, 10, 13, 11, 5, 14]
    assert tok("A_|,")["input_ids"] == [18, 19, 16, 15]  # no BOS/EOS added implicitly
    assert tok.decode([1, 17, 6, 10, 2]) == "<|bos|>Q37<|eos|>"
    assert tok.decode([1, 17, 6, 10, 2], skip_special_tokens=True) == "Q37"

    tok.save_pretrained(tmp_path / "char")
    again = AutoTokenizer.from_pretrained(tmp_path / "char", local_files_only=True)
    assert again("Q37+82=")["input_ids"] == [17, 6, 10, 13, 11, 5, 14]
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    assert (
        build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "char"))).get_vocab()
        == tok.get_vocab()
    )


def test_user_mistakes_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="tokenizer.kind='wordpiece'"):
        TokenizerConfig(kind="wordpiece")
    with pytest.raises(ValueError, match="tokenizer.path"):
        TokenizerConfig(kind="pretrained")
    with pytest.raises(ValueError, match="without repeats"):
        char_tokenizer("0120")
