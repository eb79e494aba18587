"""Reading raw records from local jsonl / parquet / text files or, only when named, a hub dataset.

Records come out normalised and validated: `{"text": str}` for `kind="text"` (pretraining) or
`{"messages": [{"role", "content"}, ...]}` for `kind="chat"` (SFT). A row that cannot be used (bad JSON,
undecodable bytes, missing field, wrong type, empty text, unknown role, chat without an assistant turn, a file
that cannot be opened) is skipped and counted in a `SourceStats`, which the trainer logs; a long run never dies
on one bad row. jsonl is parsed here line by line, because `datasets`' json loader aborts the whole file on the
first bad line; parquet, text and hub data go through `datasets.load_dataset`, per file so one unreadable file
is skipped alone. `streaming=True` iterates without building an arrow cache (for corpora larger than disk/RAM
budgets); jsonl is always read lazily.

    cfg = SourceConfig(path="data/*.jsonl", kind="chat")
    stats = SourceStats()
    for record in iter_records(cfg, stats): ...
    logger.log(stats.as_dict()); print(stats.report())
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zaya_train.data.tokenizer import ROLES

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".txt": "text"}
KINDS = ("text", "chat")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


@dataclass
class SourceConfig:
    """Exactly one of `path` (a local file, a directory or a glob) and `hub_name`."""

    path: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "train"  # hub datasets only; local files are one split
    kind: str = "text"
    format: str | None = None  # jsonl | parquet | text; None: from each file's suffix
    text_field: str = "text"
    messages_field: str = "messages"
    text_sample_by: str = "line"  # for format text: one record per line, paragraph or file
    streaming: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hub_name is None):
            raise ValueError(f"source: set exactly one of path={self.path!r} and hub_name={self.hub_name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"source.kind={self.kind!r}; expected one of {KINDS}")
        if self.format is not None and self.format not in FORMATS.values():
            raise ValueError(
                f"source.format={self.format!r}; expected one of {sorted(set(FORMATS.values()))}"
            )
        if self.text_sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(
                f"source.text_sample_by={self.text_sample_by!r}; expected one of {TEXT_SAMPLE_BY}"
            )


@dataclass
class SourceStats:
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    # The first few skipped rows as "where: reason", for a readable report.
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20
    # The fields of the first row that lacked the configured one, so an error can say what the rows do hold.
    fields_of_row_missing_field: list[str] | None = None

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {reason}")

    def as_dict(self) -> dict[str, int]:
        out = {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": sum(self.skipped.values()),
        }
        out.update({f"skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        return out

    def report(self) -> str:
        lines = [f"read {self.rows_read} rows, kept {self.rows_kept}, skipped {sum(self.skipped.values())}"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)


def resolve_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FORMATS)
    else:
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    if not files:
        raise ValueError(f"source.path={path!r} matches no data files (suffixes {sorted(FORMATS)})")
    return files


def validate(row: Any, config: SourceConfig) -> tuple[dict | None, str | None]:
    """(normalised record, None) or (None, reason)."""
    if not isinstance(row, dict):
        return None, "wrong_type"
    name = config.text_field if config.kind == "text" else config.messages_field
    if row.get(name) is None:
        return None, "missing_field"
    value = row[name]
    if config.kind == "text":
        if not isinstance(value, str):
            return None, "wrong_type"
        if not value.strip():
            return None, "empty_text"
        return {"text": value}, None
    if not isinstance(value, list):
        return None, "wrong_type"
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return None, "wrong_type"
        if message.get("role") not in ROLES:
            return None, "unknown_role"
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no_assistant_turn"
    return {"messages": messages}, None


def _jsonl_rows(path: Path, stats: SourceStats) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.rows_read += 1
                stats.skip("bad_encoding", where)
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                stats.rows_read += 1
                stats.skip("bad_json", where)
                continue
            yield row, where


def _datasets_rows(data: Iterable[dict], label: str) -> Iterator[tuple[Any, str]]:
    for index, row in enumerate(data):
        yield row, f"{label}#{index}"


def _load_file(path: Path, fmt: str, config: SourceConfig):
    import datasets  # imported here: it is slow to import and only parquet/text/hub need it

    kwargs = {"sample_by": config.text_sample_by} if fmt == "text" else {}
    return datasets.load_dataset(
        fmt,
        data_files=[str(path)],
        split="train",
        streaming=config.streaming,
        cache_dir=config.cache_dir,
        **kwargs,
    )


def _rows(config: SourceConfig, stats: SourceStats) -> Iterator[tuple[Any, str]]:
    if config.hub_name is not None:
        import datasets

        data = datasets.load_dataset(
            config.hub_name,
            config.hub_config,
            split=config.split,
            streaming=config.streaming,
            cache_dir=config.cache_dir,
        )
        yield from _datasets_rows(data, config.hub_name)
        return
    for path in resolve_files(config.path):
        fmt = config.format or FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(f"source file {str(path)!r}: unknown suffix; set source.format")
        if fmt == "jsonl":
            yield from _jsonl_rows(path, stats)
            continue
        # A corrupt file fails when opened or while read; either way skip the rest of that file only.
        try:
            yield from _datasets_rows(_load_file(path, fmt, config), str(path))
        except Exception as error:  # noqa: BLE001 - any reader error of one file must not end the run
            stats.skip("unreadable_file", f"{path} ({type(error).__name__}: {error})")


def iter_records(config: SourceConfig, stats: SourceStats | None = None) -> Iterator[dict]:
    """Validated records in file order (files sorted by name); `stats` is updated as rows are read."""
    stats = stats if stats is not None else SourceStats()
    for row, where in _rows(config, stats):
        stats.rows_read += 1
        record, reason = validate(row, config)
        if record is None:
            stats.skip(reason, where)
            if reason == "missing_field" and stats.fields_of_row_missing_field is None:
                stats.fields_of_row_missing_field = sorted(map(str, row))
            continue
        stats.rows_kept += 1
        yield record
