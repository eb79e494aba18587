"""Data layer: raw records -> tokenizer -> answer-preserving trim -> packed windows -> sharded, resumable batches.

    from zaya_train.data import (SourceConfig, SourceStats, iter_records, train_bpe, tokenize_chat,
                                 trim_conversations, pack_sft, pack_pretrain, PretrainPackConfig,
                                 WindowArrays, PackedLoader, LoaderConfig)
    # SFT
    stats = SourceStats()
    chats = [r["messages"] for r in iter_records(SourceConfig(path="sft/*.jsonl", kind="chat"), stats)]
    chats, trim_stats = trim_conversations(chats, tok, max_tokens=seq_len)
    windows, pack_stats = pack_sft([tokenize_chat(c, tok) for c in chats], seq_len, tok.pad_token_id)
    loader = PackedLoader(WindowArrays.from_windows(windows), LoaderConfig(micro_batch_size=4), rank, world)
    # SFT with aggregation chats as 5% of the samples, in the layout RL feeds them (mixing.py)
    extra = list(aggregation_examples("aggregation_sft.jsonl", tok, SourceStats()))
    examples, mix_stats = mix_examples([tokenize_chat(c, tok) for c in chats], extra, share=0.05, seed=0)
    # pretraining, streamed
    docs = lambda: (tok(r["text"], add_special_tokens=False)["input_ids"] for r in iter_records(src_cfg))
    loader = PackedLoader(lambda: pack_pretrain(docs(), pack_cfg), LoaderConfig(micro_batch_size=4), rank, world)
    # nano recipe
    loader = PackedLoader(ChainSumDataset(ChainSumConfig(), char_tokenizer(NANO_CHARS), size=32_000), cfg)

Each module's docstring has the details.
"""

from zaya_train.data.loader import LoaderConfig, PackedLoader
from zaya_train.data.mixing import aggregation_examples, mix_examples, raw_prompt_example
from zaya_train.data.packing import (
    IGNORE_INDEX,
    PackedWindow,
    PackStats,
    PretrainPackConfig,
    SFTExample,
    SFTPackStats,
    WindowArrays,
    best_fit_decreasing,
    pack_pretrain,
    pack_sft,
    tokenize_chat,
)
from zaya_train.data.sources import SourceConfig, SourceStats, iter_records
from zaya_train.data.synthetic import (
    NANO_CHARS,
    ChainSumConfig,
    ChainSumDataset,
    ChainSumProblem,
    extract_answer,
    held_out_problems,
    is_correct,
    make_problem,
    validation_problems,
)
from zaya_train.data.tokenizer import (
    CHAT_TEMPLATE,
    TokenizerConfig,
    build_tokenizer,
    char_tokenizer,
    load_tokenizer,
    train_bpe,
    wrap_tokenizer,
)
from zaya_train.data.trimming import TrimStats, ap_trim, trim_conversations

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "NANO_CHARS",
    "ChainSumConfig",
    "ChainSumDataset",
    "ChainSumProblem",
    "LoaderConfig",
    "PackStats",
    "PackedLoader",
    "PackedWindow",
    "PretrainPackConfig",
    "SFTExample",
    "SFTPackStats",
    "SourceConfig",
    "SourceStats",
    "TokenizerConfig",
    "TrimStats",
    "WindowArrays",
    "aggregation_examples",
    "ap_trim",
    "best_fit_decreasing",
    "build_tokenizer",
    "char_tokenizer",
    "extract_answer",
    "held_out_problems",
    "is_correct",
    "iter_records",
    "load_tokenizer",
    "make_problem",
    "mix_examples",
    "pack_pretrain",
    "pack_sft",
    "raw_prompt_example",
    "tokenize_chat",
    "train_bpe",
    "trim_conversations",
    "validation_problems",
    "wrap_tokenizer",
]
