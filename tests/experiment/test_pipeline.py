"""The main job's stages: their order and settings, subsets, seeds, resuming, and held-out problems never trained on.
Stage runs are replaced by a recorder here; tests/experiment/test_main_job.py runs them for real."""

import json

import pytest

from zaya_train.cli import compose_run_config
from zaya_train.data import ChainSumConfig, ChainSumDataset, held_out_problems
from zaya_train.experiment.pipeline import plan, run_main_job
from zaya_train.jobs import STAGES_FILE, StageInterrupted, interrupted_exit_code
from zaya_train.loading import DS_TAG, TRAINER_STATE
from zaya_train.rl.prompts import prompt_source
from zaya_train.rl.warmstart import POOL_OFFSET
from zaya_train.train.config import ConfigError


def main_job(*overrides):
    return compose_run_config("nano", ["trainer.progress_bar=false", *overrides])


def fake_checkpoint(directory):
    step = directory / "checkpoints" / "step_00000001"
    (step / DS_TAG).mkdir(parents=True, exist_ok=True)
    (step / TRAINER_STATE).write_text("{}")


def stage_configs(jobs):
    """Each job's composed config; the models the stages start from are faked so the configs validate."""
    for job in jobs:
        if job.recipe != "eval_rsa":
            fake_checkpoint(job.directory)
    return {j.key: compose_run_config(j.recipe, [*j.overrides, f"run_dir={j.directory}"]) for j in jobs}


class Recorder:
    """Stands in for a stage run: records the job, writes a checkpoint, optionally stops on a signal at `stop_at`."""

    def __init__(self, stop_at=None):
        self.keys, self.stop_at = [], stop_at

    def __call__(self, job):
        if job.key == self.stop_at:
            raise StageInterrupted(job.key, "signal SIGTERM")
        self.keys.append(job.key)
        fake_checkpoint(job.directory)
        return {"step": 1, "reason": "max_steps", "loss": 0.0}


def test_stages_run_in_order_from_one_base_and_warm_start_per_seed(tmp_path):
    cfg = main_job("seeds=[0,1]", "experiment.rl_compute_tokens=12345")
    jobs = plan(cfg, tmp_path)
    assert [j.key for j in jobs] == [
        "pretrain", "base", "warmstart", "seed0/plain_rl", "seed0/codesign_rl", "seed1/plain_rl", "seed1/codesign_rl",
        "eval/base", "eval/warmstart", "eval/seed0/plain_rl", "eval/seed0/codesign_rl", "eval/seed1/plain_rl",
        "eval/seed1/codesign_rl",
    ]
    configs = stage_configs(jobs)
    assert configs["base"].model.init_from == str(tmp_path / "pretrain")
    assert configs["base"].seed != configs["pretrain"].seed, "the second pretraining run draws fresh problems"
    assert configs["warmstart"].model.init_from == str(tmp_path / "base")
    for seed in (0, 1):
        plain, codesign = configs[f"seed{seed}/plain_rl"], configs[f"seed{seed}/codesign_rl"]
        assert plain.seed == codesign.seed == seed
        assert plain.model.init_from == codesign.model.init_from == str(tmp_path / "warmstart")
        assert plain.rl.max_compute_tokens == codesign.rl.max_compute_tokens == 12345, "equal compute"
        assert plain.optim.lr == codesign.optim.lr == cfg.experiment.rl_lr
        assert plain.rl.loss_aggregation == codesign.rl.loss_aggregation == "sequence_mean"
        assert plain.rl.codesign.share == 0 and codesign.rl.codesign.share == 0.5
        assert codesign.rl.codesign.rounds == 2
    evaluations = [c for key, c in configs.items() if key.startswith("eval/")]
    assert {c.seed for c in evaluations} == {cfg.seed}, "every model is sampled with the same seed"
    assert {(c.rsa.n, c.rsa.c, c.rsa.tau, c.rsa.t, c.eval.num_problems) for c in evaluations} == {(8, 4, 16, 3, 200)}


def test_a_subset_runs_in_the_main_jobs_order_and_needs_its_inputs(tmp_path):
    recorder = Recorder()
    run_main_job(main_job("stages=[warmstart,pretrain]"), tmp_path, run_job=recorder)
    assert recorder.keys == ["pretrain", "base", "warmstart"]
    with pytest.raises(ConfigError, match="stages: seed0/plain_rl starts from .*warmstart.*add stage warmstart"):
        run_main_job(main_job("stages=[plain_rl]"), tmp_path / "fresh", run_job=Recorder())
    with pytest.raises(ConfigError, match="stages"):
        main_job("stages=[pretrain,finetune]")
    recorder = Recorder()
    with pytest.raises(ConfigError, match=r"^rl\.codesign\.sharez: "):
        run_main_job(main_job("experiment.overrides.codesign_rl=['rl.codesign.sharez=0.3']"), tmp_path / "typo",
                     run_job=recorder)
    assert recorder.keys == [], "a typo in a later stage's overrides stops the job before the first stage"


def test_resume_skips_finished_stages_and_continues_the_interrupted_one(tmp_path):
    cfg = main_job("stages=[pretrain,warmstart,plain_rl,codesign_rl]")
    with pytest.raises(StageInterrupted) as interrupted:
        run_main_job(cfg, tmp_path, run_job=Recorder(stop_at="warmstart"))
    assert interrupted_exit_code(interrupted.value) == 128 + 15, "the shell's code for a SIGTERM'd process"
    record = json.loads((tmp_path / STAGES_FILE).read_text())
    assert sorted(record) == ["base", "pretrain"] and all(v["done"] for v in record.values())
    assert record["base"]["command"].startswith("zaya-train recipe=nano_pretrain ")

    resumed = Recorder()
    run_main_job(main_job("stages=[pretrain,warmstart,plain_rl,codesign_rl]", "trainer.resume=auto"), tmp_path,
                 run_job=resumed)
    assert resumed.keys == ["warmstart", "seed0/plain_rl", "seed0/codesign_rl"]
    with pytest.raises(ConfigError, match="trainer.resume: .* already holds a main job"):
        run_main_job(main_job("trainer.resume=none"), tmp_path, run_job=Recorder())


def test_no_stage_trains_on_a_held_out_problem(tmp_path):
    """Every problem the default main job's training stages draw, at their default budgets, is outside the 200
    evaluation problems (the generator redraws a hit; tests/data/test_synthetic.py checks that on a tiny space)."""
    held = {p.prompt for p in held_out_problems(ChainSumConfig())}
    jobs = plan(main_job(), tmp_path)
    configs = stage_configs(jobs)
    trained = set()
    for job in jobs:
        stage = configs[job.key]
        if job.recipe == "nano_pretrain":
            assert stage.data.kind == "chain_sum"
            dataset = ChainSumDataset(ChainSumConfig(), None, size=stage.data.num_samples, seed=stage.seed)
            used = min(stage.data.num_samples, stage.trainer.max_steps * stage.data.micro_batch_size)
            trained |= {dataset.problem(i).prompt for i in range(used)}
        elif job.recipe in ("warmstart", "rl"):
            assert stage.rl.data == "nano_chain_sum"
            source = prompt_source(stage.rl.data, stage.seed)
            # RL takes problems 0, 1, ... in step order; the warm start also its pool from POOL_OFFSET on.
            indices = [*range(4000), *range(POOL_OFFSET, POOL_OFFSET + stage.rl.warmstart.pool_problems)]
            trained |= {source[i][0] for i in indices}
    assert len(trained) > 40_000
    assert not trained & held
