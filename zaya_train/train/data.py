"""The run's tokenizer and packed training windows, built from `DataConfig` (see zaya_train/data for each step).

Rank 0 builds a tokenizer that needs building (BPE trained on the run's own data) and saves it to
`run_dir/tokenizer`; the other ranks wait and load it, so every rank encodes identically. Window building is
deterministic, so every rank packs the same windows and the loader takes each rank's slice. SFT with
`data.mix_path` adds aggregation chats as `data.mix_share` of the samples (zaya_train/data/mixing.py).

`data.sources` reads a weighted mixture instead of `data.path` (zaya_train/data/weighted.py): each window then
carries `source_ids`, the stats hold each source's target share and draw probability, and the trainer logs the
shares delivered.

A source that yields no window raises ConfigError naming what to fix: `data.text_field` (or
`data.messages_field`) when rows exist but none has that field, else `data.path`. Every rank checks the source
for a usable record first, before a tokenizer is trained; a stream also checks each pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from zaya_train.data import (
    NANO_CHARS,
    ChainSumConfig,
    ChainSumDataset,
    PackedWindow,
    PackStats,
    PretrainPackConfig,
    SFTExample,
    SourceConfig,
    SourceStats,
    WindowArrays,
    aggregation_examples,
    char_tokenizer,
    iter_records,
    load_tokenizer,
    mix_examples,
    pack_pretrain,
    pack_sft,
    tokenize_chat,
    train_bpe,
    trim_conversations,
)
from zaya_train.data.loader import WindowSource
from zaya_train.data.packing import SourcedDocument
from zaya_train.data.weighted import WeightedSource, draw_probabilities, interleave_records, probe_lengths
from zaya_train.train.config import ConfigError, DataConfig


@dataclass
class TrainingData:
    tokenizer: Any
    windows: WindowSource
    # Counts worth a look before a long run: malformed rows skipped, samples trimmed or dropped, padding.
    stats: dict[str, int] = field(default_factory=dict)
    # What the windows' source_ids index (data.sources, then "aggregation" for data.mix_path's chats); empty
    # when the windows have none.
    source_names: list[str] = field(default_factory=list)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _source(cfg: DataConfig, kind: str) -> SourceConfig:
    return SourceConfig(
        path=cfg.path,
        hub_name=cfg.hub_name,
        split=cfg.split,
        kind=kind,
        format=cfg.format,
        text_field=cfg.text_field,
        messages_field=cfg.messages_field,
        streaming=cfg.streaming,
    )


def _weighted_sources(cfg: DataConfig, kind: str) -> list[WeightedSource]:
    return [
        WeightedSource(s.name, SourceConfig(path=s.path, hub_name=s.hub_name, split=s.split, kind=kind,
                                            format=s.format, text_field=s.text_field,
                                            messages_field=s.messages_field, streaming=cfg.streaming), s.weight)
        for s in cfg.sources
    ]


class _Records:
    """The run's records as (record, source index or None): `data.path`'s in file order, or `data.sources`
    interleaved with the probabilities that make the weights hold (zaya_train/data/weighted.py)."""

    def __init__(self, cfg: DataConfig, kind: str, seed: int, tokenizer: Any = None) -> None:
        self.cfg, self.kind, self.seed = cfg, kind, seed
        self.sources = _weighted_sources(cfg, kind)
        weights = [s.weight for s in self.sources]
        self.targets = [w / sum(weights) for w in weights]
        if not self.sources:
            self.probabilities = []
        elif tokenizer is None or cfg.share_unit == "documents":
            self.probabilities = draw_probabilities(weights, [1.0] * len(weights), "documents")
        else:
            lengths = probe_lengths(self.sources, lambda record: _record_tokens(record, kind, tokenizer))
            self.probabilities = draw_probabilities(weights, lengths, "tokens")

    def __call__(self, stats: SourceStats, by_source: dict[str, SourceStats] | None = None
                 ) -> Iterator[tuple[dict[str, Any], int | None]]:
        if not self.sources:
            return ((record, None) for record in iter_records(_source(self.cfg, self.kind), stats))
        return interleave_records(self.sources, self.probabilities, self.seed,
                                  by_source if by_source is not None else {})

    def stats(self) -> dict[str, float]:
        return {
            **{f"data/mix/{s.name}/target_share": t for s, t in zip(self.sources, self.targets, strict=True)},
            **{f"data/mix/{s.name}/probability": p for s, p in zip(self.sources, self.probabilities, strict=True)},
        }


def _record_tokens(record: dict[str, Any], kind: str, tokenizer: Any) -> int:
    """The tokens a record takes in the windows: text with the BOS and EOS packing adds, a chat as its
    template renders it (before any trimming)."""
    if kind == "text":
        return len(tokenizer(record["text"], add_special_tokens=False)["input_ids"]) + 2
    return len(tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"])


def build_tokenizer(cfg: DataConfig, run_dir: Path, rank: int) -> Any:
    saved = run_dir / "tokenizer"
    if cfg.tokenizer == "char":
        tokenizer = char_tokenizer(NANO_CHARS)
    elif cfg.tokenizer == "bpe":
        if not saved.is_dir():
            if rank == 0:
                kind = "chat" if cfg.kind == "sft" else "text"
                records = _Records(cfg, kind, seed=0)(SourceStats())
                texts = (
                    r["text"] if kind == "text" else "\n".join(m["content"] for m in r["messages"])
                    for r, _ in records
                )
                train_bpe(texts=texts, vocab_size=cfg.bpe_vocab_size).save_pretrained(saved)
            _barrier()
        return load_tokenizer(saved)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    if rank == 0 and not saved.is_dir():
        tokenizer.save_pretrained(saved)
    return tokenizer


def build_training_data(cfg: DataConfig, run_dir: Path, seed: int, rank: int) -> TrainingData:
    if cfg.kind != "chain_sum":
        _require_a_record(cfg, "text" if cfg.kind == "pretrain" else "chat")
    tokenizer = build_tokenizer(cfg, run_dir, rank)
    if cfg.kind != "chain_sum":
        records = _Records(cfg, "text" if cfg.kind == "pretrain" else "chat", seed, tokenizer)
    if cfg.kind == "chain_sum":
        if cfg.tokenizer != "char":
            raise ConfigError(
                f"data.tokenizer: the chain_sum task uses the char tokenizer, got {cfg.tokenizer!r}"
            )
        windows = ChainSumDataset(ChainSumConfig(), tokenizer, size=cfg.num_samples, seed=seed)
        if len(windows[0].input_ids) != cfg.seq_len:
            raise ConfigError(
                f"data.seq_len: chain_sum windows are {len(windows[0].input_ids)} tokens, got {cfg.seq_len}"
            )
        return TrainingData(tokenizer, windows)

    source_stats = SourceStats()
    if cfg.kind == "pretrain":
        pack_cfg = PretrainPackConfig(
            seq_len=cfg.seq_len,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        pack_stats = PackStats()

        def documents(stats: SourceStats, by_source: dict[str, SourceStats] | None = None
                      ) -> Iterable[list[int] | SourcedDocument]:
            for record, index in records(stats, by_source):
                ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
                yield ids if index is None else SourcedDocument(ids, index)

        if cfg.streaming:

            def stream() -> Iterator[PackedWindow]:
                # The loader starts a new pass whenever one ends, so a pass without a window (the files changed
                # since the check above, or every text tokenized to nothing) must end the run instead.
                pass_stats = SourceStats()
                empty = True
                for window in pack_pretrain(documents(pass_stats), pack_cfg):
                    empty = False
                    yield window
                if empty:
                    raise _no_windows_error(
                        cfg, "text", pass_stats, _prefixed("data/source", pass_stats.as_dict())
                    )

            return TrainingData(tokenizer, stream, records.stats(), _source_names(cfg))
        by_source: dict[str, SourceStats] = {}
        packed = list(pack_pretrain(documents(source_stats, by_source), pack_cfg, pack_stats))
        source_stats = _totals(source_stats, by_source)
        kind = "text"
        stats = {
            **_prefixed("data/source", source_stats.as_dict()),
            **_source_stats(by_source),
            **_prefixed("data/pack", pack_stats.as_dict()),
        }
    else:
        by_source = {}
        rows = list(records(source_stats, by_source))
        source_stats = _totals(source_stats, by_source)
        chats, origins = [r["messages"] for r, _ in rows], [i for _, i in rows]
        trim_stats = {}
        if cfg.ap_trim:
            chats, trim = trim_conversations(chats, tokenizer, max_tokens=cfg.seq_len)
            trim_stats = _prefixed("data/trim", trim.as_dict())
            dropped = set(trim.dropped_indices)
            origins = [origin for i, origin in enumerate(origins) if i not in dropped]
        examples = [tokenize_chat(c, tokenizer) for c in chats]
        for example, origin in zip(examples, origins, strict=True):
            example.source = origin
        mix_stats = {}
        if cfg.mix_path is not None:
            examples, mix_stats = _mix_aggregation_chats(cfg, examples, tokenizer, seed)
            if cfg.sources:
                for example in examples:
                    if example.source is None:
                        example.source = len(cfg.sources)
        packed, pack_stats = pack_sft(examples, cfg.seq_len, tokenizer.pad_token_id)
        kind = "chat"
        stats = {
            **_prefixed("data/source", source_stats.as_dict()),
            **_source_stats(by_source),
            **trim_stats,
            **mix_stats,
            **_prefixed("data/pack", pack_stats.as_dict()),
        }
    if not packed:
        raise _no_windows_error(cfg, kind, source_stats, stats)
    windows = WindowArrays.from_windows(packed)
    stats.update(records.stats())
    names = _source_names(cfg)
    if names:
        counts = np.bincount(windows.source_ids[windows.source_ids >= 0], minlength=len(names))
        stats.update({f"data/mix/{name}/tokens": int(n) for name, n in zip(names, counts, strict=True)})
    return TrainingData(tokenizer, windows, stats, names)


def _source_names(cfg: DataConfig) -> list[str]:
    if not cfg.sources:
        return []
    return [s.name for s in cfg.sources] + (["aggregation"] if cfg.mix_path is not None else [])


def _totals(stats: SourceStats, by_source: dict[str, SourceStats]) -> SourceStats:
    """`stats` with the counts of every weighted source added (those are kept per source while reading)."""
    for part in by_source.values():
        stats.rows_read += part.rows_read
        stats.rows_kept += part.rows_kept
        stats.skipped.update(part.skipped)
        stats.examples.extend(part.examples[: max(0, stats.max_examples - len(stats.examples))])
        stats.fields_of_row_missing_field = stats.fields_of_row_missing_field or part.fields_of_row_missing_field
    return stats


def _source_stats(by_source: dict[str, SourceStats]) -> dict[str, int]:
    return {k: v for name, stats in by_source.items() for k, v in _prefixed(f"data/source/{name}", stats.as_dict()).items()}


def _mix_aggregation_chats(
    cfg: DataConfig, chats: list[SFTExample], tokenizer: Any, seed: int
) -> tuple[list[SFTExample], dict[str, float]]:
    """`chats` with `data.mix_share` of the samples drawn from `data.mix_path` (zaya_train/data/mixing.py).
    Examples longer than a window are left out of both sides first (counted), so the share holds in the packed
    windows."""
    source = SourceStats()
    extra = list(aggregation_examples(cfg.mix_path, tokenizer, source))
    fitting = [e for e in chats if len(e) <= cfg.seq_len]
    fitting_extra = [e for e in extra if len(e) <= cfg.seq_len]
    try:
        mixed, counts = mix_examples(fitting, fitting_extra, cfg.mix_share, seed)
    except ValueError as err:
        raise ConfigError(
            f"data.mix_path: no aggregation chat of {cfg.mix_path} can be drawn "
            f"({source.report().splitlines()[0]}; {len(extra) - len(fitting_extra)} longer than "
            f"data.seq_len={cfg.seq_len})"
        ) from err
    counts = {**counts, "chats_too_long": len(chats) - len(fitting),
              "aggregation_too_long": len(extra) - len(fitting_extra)}
    return mixed, {**_prefixed("data/mix/source", source.as_dict()), **_prefixed("data/mix", counts)}


def _require_a_record(cfg: DataConfig, kind: str) -> None:
    """Raises the ConfigError naming the key to fix when the source has no usable record. Every rank checks, and
    before a BPE tokenizer is trained on nothing and saved to the run directory, where a rerun would reuse it.
    Reads up to the first usable record (the whole source only when there is none)."""
    for source in _weighted_sources(cfg, kind):
        stats = SourceStats()
        if next(iter_records(source.source, stats), None) is None:
            where = source.source.path or source.source.hub_name
            raise ConfigError(f"data.sources.{source.name}.path: no usable record in {where} "
                              f"({stats.report().splitlines()[0]})")
    if cfg.sources:
        return
    stats = SourceStats()
    if next(iter_records(_source(cfg, kind), stats), None) is None:
        raise _no_windows_error(cfg, kind, stats, _prefixed("data/source", stats.as_dict()))


def _no_windows_error(cfg: DataConfig, kind: str, source: SourceStats, stats: dict[str, int]) -> ConfigError:
    """Names the key to fix: the record field when rows exist but none has it, else the source itself."""
    where = cfg.path or cfg.hub_name or ", ".join(s.path or s.hub_name for s in cfg.sources)
    source_key = "data.sources" if cfg.sources else "data.path"
    key, name = (
        ("data.text_field", cfg.text_field) if kind == "text" else ("data.messages_field", cfg.messages_field)
    )
    if source.rows_read == 0 and not source.skipped:
        return ConfigError(f"{source_key}: {where} holds no rows")
    if source.rows_kept == 0 and source.fields_of_row_missing_field is not None:
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(source.skipped.items()))
        return ConfigError(
            f"{key}: none of the {source.rows_read} rows of {where} has a field {name!r} (skipped: {skipped}; "
            f"the first row without it has the fields {source.fields_of_row_missing_field})"
        )
    if source.rows_kept == 0:
        return ConfigError(f"{source_key}: no usable row in {where} ({stats}; e.g. {source.examples[0]})")
    return ConfigError(f"{source_key}: no training windows could be built from {where} ({stats})")


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, int]:
    return {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
