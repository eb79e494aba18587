"""ZAYA1's own phases as recipes (zaya1_pretrain1 -> zaya1_pretrain2 -> zaya1_midtrain -> zaya1_sft): each composes
with its weighted sources and the RoPE base of its phase; the 32K and 131K phases refuse to start without context
parallelism and say so; a toy-sized override of each (model=nano, a few lines of data per source) trains a few
steps from the phase before, logging every source's delivered share. Run: pytest tests/train/test_zaya1_phases.py"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from zaya_train.cli import _register_schema, check_config, compose_run_config
from zaya_train.data import train_bpe
from zaya_train.hf import save_pretrained
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.train.config import ConfigError, padded_vocab_size

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
PHASES = {  # recipe: (sources in the recipe's order, RoPE base)
    "zaya1_pretrain1": (["web", "code", "math", "multilingual", "long_cot"], 10_000.0),
    "zaya1_pretrain2": (["web", "code", "math", "reasoning", "instruction"], 10_000.0),
    "zaya1_midtrain": (["long_cot", "web", "long_context", "code", "math_stem", "short_instruction"], 1_000_000.0),
    "zaya1_sft": (["long_cot", "web", "long_context", "code", "math", "short_instruction"], 5_000_000.0),
}
TOY = ["model=nano", "data.seq_len=64", "data.micro_batch_size=2", "optim=adamw", "deepspeed=zero0",
       "trainer.max_steps=3", "trainer.save_interval=3", "trainer.log_interval=1", "trainer.progress_bar=false",
       "schedule.warmup_steps=1", "wandb.mode=disabled"]


def text(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Per source a jsonl of text (pretraining phases) and of chats (SFT), aggregation chats, a BPE tokenizer and
    a nano model over it (`base`, to start a phase from)."""
    root = tmp_path_factory.mktemp("phases")
    rng = random.Random(0)
    names = sorted({name for sources, _ in PHASES.values() for name in sources})
    for i, name in enumerate(names):
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": text(rng, 5 + 10 * i)}) + "\n" for _ in range(20)))
        (root / f"{name}_chats.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": text(rng, 4)}, {"role": "assistant", "content": text(rng, 3 + 3 * i)}]}) + "\n"
            for _ in range(12)))
    (root / "aggregation_sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Problem: {text(rng, 4)} Candidates: {text(rng, 6)}"},
        {"role": "assistant", "content": text(rng, 3)}], "finished": True}) + "\n" for _ in range(6)))
    tokenizer = train_bpe(texts=[text(rng, 50) for _ in range(50)], vocab_size=300)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    save_pretrained(ZayaForCausalLM(preset("nano", vocab_size=padded_vocab_size(len(tokenizer)))), root / "base")
    return root


def data_overrides(recipe, root):
    sources, _ = PHASES[recipe]
    suffix = "_chats" if recipe == "zaya1_sft" else ""
    out = [f"data.sources.{i}.path={root / f'{name}{suffix}.jsonl'}" for i, name in enumerate(sources)]
    out.append(f"data.tokenizer={root / 'tokenizer'}")
    if recipe == "zaya1_sft":
        out.append(f"data.mix_path={root / 'aggregation_sft.jsonl'}")
    return out


@pytest.mark.parametrize("recipe", list(PHASES))
def test_each_phase_composes_with_its_sources_and_rope_base(recipe):
    cfg = compose_run_config(recipe, [], build=False)
    sources, rope = PHASES[recipe]
    assert [s.name for s in cfg.data.sources] == sources
    assert sum(s.weight for s in cfg.data.sources) == pytest.approx(1.0)
    assert cfg.model.rope_theta == rope
    assert cfg.data.seq_len == {"zaya1_midtrain": 32768, "zaya1_sft": 131072}.get(recipe, 4096)


@pytest.mark.parametrize("recipe", ["zaya1_midtrain", "zaya1_sft"])
def test_long_context_phases_refuse_without_context_parallelism(toy, recipe):
    _register_schema()
    given = [*data_overrides(recipe, toy), f"model.init_from={toy / 'base'}"]
    with pytest.raises(ConfigError, match=r"^trainer\.context_parallel: 8 asks for context parallelism"):
        check_config(recipe, given)


@pytest.mark.parametrize(
    ("recipe", "drop", "key"),
    [("zaya1_pretrain1", "data.tokenizer", "data.tokenizer"),
     ("zaya1_pretrain1", "data.sources.2.path", "data.sources.math.path")],
)
def test_a_missing_phase_input_names_the_key(toy, recipe, drop, key):
    _register_schema()
    given = [o for o in data_overrides(recipe, toy) if not o.startswith(drop + "=")]
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": "):
        check_config(recipe, given)


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "zaya_train", *args], cwd=cwd, text=True, capture_output=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600, check=False)


def test_validate_flag_reports_the_refusal_and_the_fix(toy, tmp_path):
    args = ["recipe=zaya1_midtrain", *data_overrides("zaya1_midtrain", toy), f"model.init_from={toy / 'base'}"]
    refused = run(*args, "--validate", cwd=tmp_path)
    assert refused.returncode == 2
    assert "trainer.context_parallel=1" in refused.stderr
    accepted = run(*args, "trainer.context_parallel=1", "--validate", cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert accepted.stdout.strip() == "zaya-train: the zaya1_midtrain config is valid"


def test_the_phases_train_in_sequence_at_toy_size(toy, tmp_path):
    before = None
    for recipe, (sources, rope) in PHASES.items():
        run_dir = tmp_path / recipe
        args = [f"recipe={recipe}", *TOY, *data_overrides(recipe, toy), f"run_dir={run_dir}"]
        if before is not None:
            args.append(f"model.init_from={before}")
        if recipe in ("zaya1_midtrain", "zaya1_sft"):
            args.append("trainer.context_parallel=1")
        proc = run(*args, cwd=tmp_path)
        assert proc.returncode == 0, f"{recipe}: {proc.stderr[-3000:]}"

        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        [data] = [r for r in rows if r.get("event") == "data"]
        steps = [r for r in rows if "event" not in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        names = sources + (["aggregation"] if recipe == "zaya1_sft" else [])
        for row in steps:
            step_shares = [row[f"data/share/{name}"] for name in names]
            assert sum(step_shares) == pytest.approx(1.0)
        assert sum(data[f"data/mix/{name}/target_share"] for name in sources) == pytest.approx(1.0)
        state = json.loads(next((run_dir / "checkpoints").glob("step_*/trainer_state.json")).read_text())
        assert {p["rope_theta"] for p in state["model_config"]["rope_parameters"].values()} == {rope}
        before = run_dir


def test_a_weighted_run_resumes_its_share_totals_and_refuses_changed_weights(toy, tmp_path):
    run_dir = tmp_path / "run"
    base = ["recipe=zaya1_pretrain1", *TOY, *data_overrides("zaya1_pretrain1", toy), f"run_dir={run_dir}",
            "trainer.save_interval=2"]
    assert run(*base, "trainer.max_steps=2", cwd=tmp_path).returncode == 0
    proc = run(*base, "trainer.max_steps=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [json.loads((run_dir / "checkpoints" / f"step_{s:08d}" / "data_state.json").read_text()) for s in (2, 4)]
    # Totals carry over the restart: four steps of 2 x 64 positions, padding excluded, all from the sources.
    before, after = (sum(state["source_tokens"].values()) for state in states)
    assert 0 < before < after <= 4 * 2 * 64
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("step") == 4 and "event" not in r][-1]
    names = PHASES["zaya1_pretrain1"][0]
    assert [last[f"data/share_total/{n}"] for n in names] == pytest.approx(
        [states[1]["source_tokens"][n] / after for n in names])

    changed = run(*base, "trainer.max_steps=6", "data.sources.0.weight=0.9", cwd=tmp_path)
    assert changed.returncode == 2
    assert "data.sources: the draw probabilities" in changed.stderr
