"""Raw record sources: malformed jsonl rows are counted by reason and skipped, chat records are validated,
parquet and text files load through `datasets` (offline, cache under tmp_path), config mistakes name the key.
Run: pytest tests/data/test_sources.py"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zaya_train.data.sources import SourceConfig, SourceStats, iter_records


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_malformed_jsonl_rows_are_counted_and_skipped(tmp_path):
    write_lines(
        tmp_path / "a.jsonl",
        [
            '{"text": "first good"}',
            '{"text": "truncated',  # bad_json
            '{"text": "   "}',  # empty_text
            '{"text": 5}',  # wrong_type
            '{"body": "no text key"}',  # missing_field
            '{"text": null}',  # missing_field
            '["a", "list"]',  # wrong_type
            b'{"text": "\xff\xfe"}',  # bad_encoding
            "",  # blank line: not a row
            '{"text": "second good", "extra": 1}',
        ],
    )
    write_lines(tmp_path / "b.jsonl", ['{"text": "third good"}'])
    stats = SourceStats()
    records = list(iter_records(SourceConfig(path=str(tmp_path)), stats))
    assert records == [{"text": "first good"}, {"text": "second good"}, {"text": "third good"}]
    assert stats.as_dict() == {
        "rows_read": 10,
        "rows_kept": 3,
        "rows_skipped": 7,
        "skipped/bad_encoding": 1,
        "skipped/bad_json": 1,
        "skipped/empty_text": 1,
        "skipped/missing_field": 2,
        "skipped/wrong_type": 2,
    }
    assert stats.examples[0] == f"{tmp_path / 'a.jsonl'}:2: bad_json"
    assert stats.fields_of_row_missing_field == ["body"]
    assert "skipped 7" in stats.report()


def test_chat_records(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>hello"}]
    write_lines(
        tmp_path / "chat.jsonl",
        [
            json.dumps({"messages": good, "source": "a"}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # no_assistant_turn
            json.dumps({"messages": [{"role": "tool", "content": "x"}, good[1]]}),  # unknown_role
            json.dumps({"messages": [{"role": "user", "content": 3}, good[1]]}),  # wrong_type
            json.dumps({"messages": "hi"}),  # wrong_type
        ],
    )
    stats = SourceStats()
    records = list(iter_records(SourceConfig(path=str(tmp_path / "*.jsonl"), kind="chat"), stats))
    assert records == [{"messages": good}]
    assert dict(stats.skipped) == {"no_assistant_turn": 1, "unknown_role": 1, "wrong_type": 2}


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_and_text_through_datasets(tmp_path, streaming):
    pq.write_table(pa.table({"text": ["p one", None, "", "p two"]}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("line one\nline two\n")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    stats = SourceStats()
    cfg = SourceConfig(path=str(tmp_path), streaming=streaming, cache_dir=str(tmp_path / "cache"))
    records = list(iter_records(cfg, stats))
    # Files in name order: broken.parquet (skipped whole), d.parquet, d.txt.
    assert records == [{"text": t} for t in ["p one", "p two", "line one", "line two"]]
    assert dict(stats.skipped) == {"unreadable_file": 1, "missing_field": 1, "empty_text": 1}


def test_config_mistakes_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path"):
        SourceConfig(path="x.jsonl", hub_name="org/data")
    with pytest.raises(ValueError, match="source.kind='image'"):
        SourceConfig(path="x.jsonl", kind="image")
    with pytest.raises(ValueError, match="source.format='csv'"):
        SourceConfig(path="x.jsonl", format="csv")
    with pytest.raises(ValueError, match="matches no data files"):
        list(iter_records(SourceConfig(path=str(tmp_path / "none*.jsonl"))))
