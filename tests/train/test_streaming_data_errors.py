"""A pretraining source that yields no training window stops the run with one line naming the key to fix
(`data.text_field` when rows exist but none has the field, `data.path` when there are no rows), streamed or
not, instead of restarting an empty stream forever. Run: pytest tests/train/test_streaming_data_errors.py"""

import json
import os
import subprocess
import sys

import pytest

from zaya_train.data import PretrainPackConfig, load_tokenizer, pack_pretrain
from zaya_train.train.config import ConfigError, DataConfig
from zaya_train.train.data import build_training_data

TEXTS = ["hello world, a first document", "a second document, somewhat longer than the first one", "third"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_cli(tmp_path, *overrides):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["recipe=pretrain", "model=nano", "data.seq_len=32", "data.micro_batch_size=2", "data.bpe_vocab_size=300",
            "trainer.max_steps=3", "schedule.warmup_steps=1", "trainer.progress_bar=false", "wandb.mode=disabled",
            f"run_dir={tmp_path / 'run'}", *overrides]
    # A hang (the bug this guards against) ends in TimeoutExpired, which fails the test.
    return subprocess.run([sys.executable, "-m", "zaya_train", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, check=False)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("zaya-train: error:")]


def test_streaming_rows_without_the_text_field_name_data_text_field(tmp_path):
    data = write_jsonl(tmp_path / "corpus.jsonl", [{"content": text} for text in TEXTS])
    proc = run_cli(tmp_path, f"data.path={data}", "data.streaming=true", "data.text_field=body")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert line.startswith("zaya-train: error: data.text_field: none of the 3 rows of ")
    assert "'body'" in line and "['content']" in line


def test_streaming_source_without_rows_names_data_path(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("")
    (tmp_path / "corpus" / "b.jsonl").write_text("\n\n")  # blank lines are not rows
    proc = run_cli(tmp_path, f"data.path={tmp_path / 'corpus'}", "data.streaming=true")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert error_lines(proc) == [f"zaya-train: error: data.path: {tmp_path / 'corpus'} holds no rows"]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("kind", "rows", "overrides", "message"),
    [
        ("pretrain", [{"content": t} for t in TEXTS], {"text_field": "body"}, r"^data\.text_field: none of the 3 rows"),
        ("pretrain", [], {}, r"^data\.path: .* holds no rows$"),
        ("pretrain", [{"text": "   "}, {"text": 5}], {}, r"^data\.path: no usable row in .*empty_text.*wrong_type"),
        ("sft", [{"chat": [{"role": "user", "content": "hi"}]}], {}, r"^data\.messages_field: none of the 1 rows"),
    ],
    ids=["missing_text_field", "no_rows", "unusable_rows", "missing_messages_field"],
)
def test_build_training_data_names_the_key(tmp_path, kind, rows, overrides, message, streaming):
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    cfg = DataConfig(kind=kind, path=str(data), tokenizer="bpe", bpe_vocab_size=300, seq_len=32,
                     streaming=streaming, **overrides)
    with pytest.raises(ConfigError, match=message):
        build_training_data(cfg, tmp_path / "run", seed=0, rank=0)
    assert not (tmp_path / "run" / "tokenizer").exists(), "no tokenizer trained on nothing is left for a rerun"


def test_directory_without_data_files_names_data_path(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.md").write_text("not a data file")
    with pytest.raises(ConfigError, match=r"^data\.path: .*matches no data files"):
        DataConfig(kind="pretrain", path=str(tmp_path / "corpus"), streaming=True)


def test_stream_is_a_fresh_pass_of_the_packed_documents(tmp_path):
    rows = [{"text": TEXTS[0]}, {"body": "skipped"}, {"text": TEXTS[1]}, {"text": TEXTS[2]}]
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    cfg = DataConfig(kind="pretrain", path=str(data), tokenizer="bpe", bpe_vocab_size=300, seq_len=16,
                     streaming=True)
    stream = build_training_data(cfg, tmp_path / "run", seed=0, rank=0).windows
    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer")
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    expected = list(pack_pretrain(docs, PretrainPackConfig(seq_len=16, bos_id=tokenizer.bos_token_id,
                                                           eos_id=tokenizer.eos_token_id,
                                                           pad_id=tokenizer.pad_token_id)))
    for _ in range(2):
        windows = list(stream())
        assert len(windows) == len(expected) > 1
        for got, want in zip(windows, expected):
            assert got.input_ids.tolist() == want.input_ids.tolist()
            assert got.labels.tolist() == want.labels.tolist()
            assert got.document_ids.tolist() == want.document_ids.tolist()
