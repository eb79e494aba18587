"""recipe=zaya1_sft: ordinary chats in the chat template plus aggregation chats in the raw-prompt layout, at
the configured share of the packed samples, identical on every rank; a few training steps from the command
line; a bad share or mix path stops the command naming the key. Run: pytest tests/train/test_sft_mix.py"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from zaya_train.cli import _register_schema, check_config
from zaya_train.data import IGNORE_INDEX, train_bpe
from zaya_train.hf import save_pretrained
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.train.config import ConfigError, DataConfig, padded_vocab_size
from zaya_train.train.data import build_training_data

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
         "mu"]
SEQ_LEN, SHARE = 256, 0.25


def messages(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def chat(i):
    return {"messages": messages(f"question {i}: " + " ".join(WORDS[: 1 + i % 6]),
                                 f"answer {i} is " + " ".join(WORDS[i % 5:]))}


def aggregation_chat(i, finished=True, prompt=None):
    prompt = prompt or f"Problem:\nq{i}\n\nCandidates:\n--- Candidate 1 ---\n{WORDS[i % 12]} \\boxed{{{i}}}\n"
    return {"messages": messages(prompt, f"so \\boxed{{{i}}}"), "problem": i, "parents": [0, 1],
            "finished": finished, "correct": None}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_mix")
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(30)))
    rows = [aggregation_chat(i, finished=i != 3) for i in range(8)]
    rows.append(aggregation_chat(99, prompt="x " * 400))  # longer than a window
    mix = root / "aggregation_sft.jsonl"
    mix.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for i in range(30) for m in chat(i)["messages"]]
    tokenizer = train_bpe(texts=texts, vocab_size=300)
    tokenizer.save_pretrained(root / "tokenizer")
    # The base model a zaya1_sft run starts from: nano, over the tokenizer's vocabulary, with the tokenizer.
    torch.manual_seed(0)
    base = ZayaForCausalLM(preset("nano", vocab_size=padded_vocab_size(len(tokenizer))))
    save_pretrained(base, root / "base")
    tokenizer.save_pretrained(root / "base")
    return root, chats, mix, tokenizer


def documents(windows):
    """(input ids, labels) of every document of every packed window."""
    out = []
    for w in windows:
        for d in range(int(w.document_ids.max()) + 1):
            at = w.document_ids == d
            out.append((w.input_ids[at].tolist(), w.labels[at].tolist()))
    return out


def test_packed_windows_hold_the_share_in_the_raw_prompt_layout(files, tmp_path):
    root, chats, mix, tokenizer = files
    cfg = DataConfig(kind="sft", path=str(chats), tokenizer=str(root / "tokenizer"), seq_len=SEQ_LEN,
                     mix_path=str(mix), mix_share=SHARE)
    data = build_training_data(cfg, tmp_path / "run0", seed=0, rank=0)
    docs = documents(data.windows)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    raw = [d for d in docs if d[0][1] != user]  # chat documents start <|bos|><|user|>, raw prompts do not
    # 30 chats kept once, round(30 * 0.25 / 0.75) = 10 aggregation samples drawn from the 8 that fit a window.
    assert (len(docs), len(raw)) == (40, 10)
    assert len(raw) / len(docs) == pytest.approx(SHARE)
    assert {k: data.stats[f"data/mix/{k}"] for k in ("chats", "aggregation", "aggregation_too_long")} == {
        "chats": 30, "aggregation": 10, "aggregation_too_long": 1}
    assert data.stats["data/mix/share"] == pytest.approx(SHARE)

    # Each aggregation sample is [BOS] + prompt + target (+ EOS when finished), loss on the target only.
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = {}
    for i in range(8):
        row = aggregation_chat(i, finished=i != 3)
        prompt = [tokenizer.bos_token_id, *encode(row["messages"][0]["content"])]
        target = encode(row["messages"][1]["content"]) + ([tokenizer.eos_token_id] if row["finished"] else [])
        expected[tuple(prompt + target)] = [IGNORE_INDEX] * len(prompt) + target
    for ids, labels in raw:
        assert tuple(ids) in expected
        assert labels == expected[tuple(ids)]

    # Every rank builds the same windows.
    other = build_training_data(cfg, tmp_path / "run1", seed=0, rank=1).windows
    for name in ("input_ids", "labels", "document_ids"):
        assert np.array_equal(getattr(data.windows, name), getattr(other, name))


def test_zaya1_sft_trains_on_the_mix(files, tmp_path):
    root, chats, mix, _ = files
    run_dir = tmp_path / "run"
    args = ["recipe=zaya1_sft", "model=nano", f"model.init_from={root / 'base'}",
            "model.gradient_checkpointing=false", f"data.sources=[{{name:chats,path:{chats}}}]",
            "trainer.context_parallel=1", f"data.tokenizer={root}/tokenizer",
            f"data.mix_path={mix}", f"data.mix_share={SHARE}", f"data.seq_len={SEQ_LEN}",
            "data.micro_batch_size=2", "deepspeed=zero0", "optim=adamw", "trainer.max_steps=2",
            "trainer.save_interval=2", "schedule.warmup_steps=1", "trainer.progress_bar=false",
            "wandb.mode=disabled", f"run_dir={run_dir}"]

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "zaya_train", *args, *extra], cwd=tmp_path, text=True,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, timeout=600,
                              check=False)

    proc = cli()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    [data] = [r for r in rows if r.get("event") == "data"]
    assert (data["data/mix/chats"], data["data/mix/aggregation"]) == (30, 10)
    assert data["data/mix/share"] == pytest.approx(SHARE)
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])

    bad = cli("data.mix_share=1.5")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "zaya-train: error: data.mix_share: must be in [0, 1], got 1.5"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.mix_share=-0.1"], "data.mix_share"),
        (["data.mix_path=/nonexistent/aggregation_sft.jsonl"], "data.mix_path"),
        (["data.mix_path=null"], "data.mix_path"),
        (["data.mix_path=null", "data.mix_share=0"], "data.mix_path"),
        (["data.tokenizer=bpe"], "data.tokenizer"),
        (["model.init_from=null"], "model.init_from"),
    ],
)
def test_bad_mix_settings_name_the_key(files, overrides, key):
    root, chats, mix, _ = files
    _register_schema()
    base = [f"model.init_from={root / 'base'}", f"data.sources=[{{name:chats,path:{chats}}}]",
            "trainer.context_parallel=1", f"data.tokenizer={root / 'tokenizer'}", f"data.mix_path={mix}"]
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": "):
        check_config("zaya1_sft", [*base, *overrides])
