"""Tokenizers: load one from a local directory, train a small byte-level BPE, or build the nano task's
character-level tokenizer. All three are `PreTrainedTokenizerFast`-compatible, save with `save_pretrained` and
reload with `transformers.AutoTokenizer` (offline, no `trust_remote_code`).

    from zaya_train.data.tokenizer import TokenizerConfig, build_tokenizer, train_bpe, char_tokenizer
    tok = build_tokenizer(TokenizerConfig(kind="pretrained", path="/models/zaya1"))   # local files only
    tok = train_bpe(texts=["some text", ...], vocab_size=1000)                      # or files=[...]
    tok = char_tokenizer("0123456789+=,|QA_")                # PAD=0, BOS=1, EOS=2, then one id per character
    tok.save_pretrained(out_dir); AutoTokenizer.from_pretrained(out_dir)           # same ids and chat template

Tokenizers built here never add BOS/EOS on their own (`tok(text)` gives the text's ids only): the packers and the
synthetic task place BOS/EOS explicitly, so the rule lives in one place whatever tokenizer is loaded. Call
`tok(text, add_special_tokens=False)` when the tokenizer comes from elsewhere.

Chat format (`CHAT_TEMPLATE`, attached by `train_bpe` and `wrap_tokenizer`), roles system/user/assistant:

    <|bos|><|user|>\\n{content}<|eos|><|assistant|>\\n{content}<|eos|>...

The assistant part (content plus its closing `<|eos|>`) sits in a `{% generation %}` block, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens SFT trains on. Assistant
content may start with a `<think>...</think>` reasoning block; `<think>` and `</think>` are single added tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from zaya_train.data.synthetic import NANO_CHARS

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

TOKENIZER_KINDS = ("pretrained", "bpe", "char")


@dataclass
class TokenizerConfig:
    """`pretrained`: load `path` (a local directory); `bpe`: train on `train_files`; `char`: one id per `chars`."""

    kind: str = "char"
    path: str | None = None
    train_files: list[str] = field(default_factory=list)
    vocab_size: int = 1000
    min_frequency: int = 2
    chars: str = NANO_CHARS

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer.kind={self.kind!r}; expected one of {TOKENIZER_KINDS}")
        if self.kind == "pretrained" and not self.path:
            raise ValueError("tokenizer.path is required when tokenizer.kind='pretrained'")
        if self.kind == "bpe" and not self.train_files:
            raise ValueError("tokenizer.train_files is required when tokenizer.kind='bpe'")


def build_tokenizer(config: TokenizerConfig) -> PreTrainedTokenizerBase:
    if config.kind == "pretrained":
        return load_tokenizer(config.path)
    if config.kind == "bpe":
        return train_bpe(
            files=config.train_files, vocab_size=config.vocab_size, min_frequency=config.min_frequency
        )
    return char_tokenizer(config.chars)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a saved tokenizer from a local directory; hub names are refused so a typo never turns into a download.
    A tokenizer without a pad token gets its EOS as pad (packers mask padding out of the loss anyway)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"tokenizer path={str(path)!r} is not a local directory (hub names are not loaded here)"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {str(path)!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` with the bos/eos/pad and role special tokens, `<think>`/`</think>` and the
    chat template. Tokens it lacks are appended to its vocabulary."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    # Not special: decode(skip_special_tokens=True) must keep the reasoning markup.
    tok.add_tokens([THINK_OPEN, THINK_CLOSE])
    return tok


def train_bpe(
    texts: Iterable[str] = (),
    files: Sequence[str | Path] = (),
    vocab_size: int = 1000,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (any text encodes, nothing maps to unk) on local files and/or an iterator of
    strings, then `wrap_tokenizer` it."""
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"train_bpe: files entry {f!r} is not a file")
    specials = [PAD, BOS, EOS, *ROLE_TOKENS, THINK_OPEN, THINK_CLOSE]
    if vocab_size < len(pre_tokenizers.ByteLevel.alphabet()) + len(specials):
        raise ValueError(
            f"train_bpe: vocab_size={vocab_size} is smaller than the 256 bytes plus special tokens"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_texts_then_file_lines(texts, files), trainer=trainer)
    return wrap_tokenizer(backend)


def _texts_then_file_lines(texts: Iterable[str], files: Sequence[str | Path]) -> Iterable[str]:
    yield from texts
    for f in files:
        with open(f, encoding="utf-8") as handle:
            yield from handle


def char_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """PAD=0, BOS=1, EOS=2, then `chars` in order. A BPE model without merges splits text into single characters;
    characters outside `chars` are dropped, so callers encode only text they generated."""
    if len(set(chars)) != len(chars) or not chars:
        raise ValueError(f"char_tokenizer: chars={chars!r} must be non-empty and without repeats")
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    vocab.update({c: 3 + i for i, c in enumerate(chars)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)
