"""Gathers the main job's evaluations, compute counts and export into results.json, report.md and the plot.

    from zaya_train.experiment.collect import collect_and_report
    collect_and_report(cfg, run_dir, stages)     # after the eval stage; `stages` is stages.json's content

Reads only files the stages wrote (rsa_results.json, the RL checkpoints' compute counters, the base's end-of-run
evaluation), so the report can be rebuilt at any time with `zaya-train stages=[eval] trainer.resume=auto`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zaya_train.experiment.config import ARMS, check_seeds
from zaya_train.experiment.pipeline import EXPORT_DIR, Layout
from zaya_train.loading import latest_checkpoint
from zaya_train.rsa.metrics import RESULTS_FILE


def _payload(directory: Path) -> dict[str, Any] | None:
    path = directory / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def arm_compute(run_dir: Path) -> dict[str, int] | None:
    """Prefilled, decoded and trained tokens an RL run counted, from its latest checkpoint."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    counts = json.loads((checkpoint / "data_state.json").read_text())["compute"]
    counts = {key: int(counts[key]) for key in ("prefill", "decode", "trained")}
    return {**counts, "total": sum(counts.values())}


def base_pretraining(base_dir: Path) -> dict[str, float] | None:
    """The base's end-of-run held-out accuracies (greedy, and temperature 1 with 4 samples per problem)."""
    metrics = base_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [row for row in rows if row.get("event") == "eval"]
    if not evals:
        return None
    last = evals[-1]
    return {"greedy_accuracy": last["eval/greedy_accuracy"], "sampled_accuracy": last["eval/sampled_accuracy"],
            "problems": last["eval/problems"], "step": last["step"]}


def export_and_generate(checkpoint_dir: Path, out: Path) -> dict[str, Any]:
    """Exports the model with its tokenizer in HF format, loads it with transformers' AutoModelForCausalLM and
    decodes the first held-out problem greedily: the export works outside this package."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from zaya_train.data import ChainSumConfig, held_out_problems, is_correct
    from zaya_train.train.export import export_checkpoint

    path = export_checkpoint(checkpoint_dir, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    # transformers re-initialises the routers' skip-class bias on load (zaya_train/hf.py): put the trained ones back.
    biases = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.endswith("balancing_biases")}
    if unexpected := model.load_state_dict(biases, strict=False).unexpected_keys:
        raise RuntimeError(f"transformers' model has no {unexpected[0]}: the export's names have drifted")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    problem = held_out_problems(ChainSumConfig())[0]
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=72, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)
    return {"path": str(path), "loaded_with": "transformers.AutoModelForCausalLM", "prompt": problem.prompt,
            "generated_text": completion, "correct": is_correct(problem, completion)}


def collect_and_report(cfg, run_dir: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Path]:
    from zaya_train.experiment.report import build_results, write_outputs

    layout = Layout(run_dir)
    seeds = check_seeds(list(cfg.seeds) if cfg.seeds else [cfg.seed])
    base_dir = layout.base(cfg.experiment.anneal_steps > 0)
    shared = {name: p for name in ("base", "warmstart") if (p := _payload(layout.eval(name))) is not None}
    per_seed = {seed: {arm: p for arm in ARMS if (p := _payload(layout.eval(arm, seed))) is not None}
                for seed in seeds}
    compute = {seed: {arm: c for arm in ARMS if (c := arm_compute(layout.arm(seed, arm))) is not None}
               for seed in seeds}
    run: dict[str, Any] = {"wall_s": {key: value["wall_s"] for key, value in stages.items()},
                           "stage_commands": {key: value["command"] for key, value in stages.items()}}
    if (pretraining := base_pretraining(base_dir)) is not None:
        run["base_pretraining"] = pretraining
    codesign_dir = layout.arm(seeds[0], "codesign_rl")
    if latest_checkpoint(codesign_dir) is not None:
        run["export"] = export_and_generate(codesign_dir, run_dir / EXPORT_DIR)
    results = build_results(shared, per_seed, compute, run, split=cfg.experiment.eval_split)
    outputs = write_outputs(results, run_dir)
    if "export" in run:
        outputs["export"] = Path(run["export"]["path"])
    print(results["verdict"], flush=True)
    return outputs
