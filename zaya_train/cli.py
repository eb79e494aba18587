"""The `zaya-train` command: Hydra recipes for the main job, pretraining, SFT, RL, evaluation and export.

    zaya-train                                         # the main job: a nano co-design experiment on the CPU
    zaya-train recipe=nano_pretrain                    # its pretraining stage alone
    zaya-train recipe=pretrain data.path=corpus.jsonl model=small trainer.max_steps=2000
    zaya-train recipe=export checkpoint=runs/nano/... out=exports/nano
    zaya-train recipe=eval_rsa checkpoint=runs/nano/... eval.data=nano_chain_sum rsa.t=2
    zaya-train recipe=build_aggregation_sft aggregation_sft.problems=p.jsonl aggregation_sft.teacher=exports/t
    zaya-train recipe=zaya1_sft data.sources.0.path=long_cot.jsonl ... data.mix_path=runs/agg/aggregation_sft.jsonl
    zaya-train recipe=zaya1_midtrain ... --validate    # compose and check the config, run nothing (exit 0 / 2)
    zaya-train recipe=rl model.init_from=runs/nano/... rl.codesign.share=0.5 rl.codesign.rounds=2
    zaya-train recipe=nano_cascade                     # the ZAYA1 RL cascade's stages back to back, toy size
    zaya-train recipe=plan model=zaya1_8b cluster=mi300x nodes=128   # memory, FLOPs and time of a run, no GPU
    zaya-train recipe=doctor                           # is this node usable for GPU training? (exit 0 / 1)
    zaya-train -m recipe=nano_pretrain optim.lr=1e-3,3e-3   # a sweep: one job per value
    torchrun --nproc_per_node=2 -m zaya_train recipe=nano_pretrain deepspeed=zero2

Recipes live in `recipes/`, config groups in `conf/` (model, data, optim, deepspeed, trainer, logging, rsa, rl). Every key
is typed (zaya_train/train/config.py): an unknown key, a wrong type or an impossible value stops the command
before anything is built, with one line naming the key and exit code 2.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
RECIPES_DIR = PACKAGE_DIR / "recipes"
DEFAULT_RECIPE = "nano"
# Dataclass names in messages from the config dataclasses, and the keys users type for them.
_KEY_PREFIXES = {
    "OptimConfig.": "optim.", "ScheduleConfig.": "schedule.", "BalancerConfig.": "balancer.", "WandbConfig.": "wandb.",
    "RSAConfig.": "rsa.",
}


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from zaya_train.train.config import RunConfig

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def one_line(error: BaseException) -> str:
    """The key and the first line of the message, from the first error in the chain that names a key."""
    seen = error
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            message = str(seen).splitlines()[0]
            return f"{seen.full_key}: {message}"
        seen = seen.__cause__ or seen.__context__
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    for name, key in _KEY_PREFIXES.items():
        message = message.replace(name, key)
    return message


def _first_sweep_values(overrides: list[str]) -> list[str]:
    """A sweep (`a=1,2`) replaced by its first value, so one job's config can be checked before Hydra starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(text)
    return out


def to_run_config(cfg: DictConfig):
    from zaya_train.train.config import ConfigError, RunConfig, validate

    try:
        run_cfg = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(one_line(err)) from err
    assert isinstance(run_cfg, RunConfig)
    validate(run_cfg)
    return run_cfg


def compose_run_config(recipe: str, overrides: list[str], build: bool = True):
    """The validated RunConfig of `recipe` with `overrides` (no sweeps); with `build=False` only the composed
    DictConfig, checked for unknown keys and wrong types but not for values (paths may not exist yet).
    Raises ConfigError naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from zaya_train.train.config import ConfigError

    _register_schema()
    overrides = overrides + [f"hydra.searchpath=[file://{CONF_DIR}]"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside the zaya-train app (the main job's stages)
            cfg = compose(config_name=recipe, overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
                cfg = compose(config_name=recipe, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(one_line(err)) from err
    return to_run_config(cfg) if build else cfg


def check_config(recipe: str, overrides: list[str]) -> None:
    """Composes and validates the config of `recipe` with `overrides` (first sweep values); raises ConfigError."""
    compose_run_config(recipe, _first_sweep_values(overrides))


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from zaya_train.train.config import ConfigError

    _console_logging()
    try:
        run_cfg = to_run_config(cfg)
    except ConfigError as err:
        print(f"zaya-train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir if hydra_cfg.mode == RunMode.MULTIRUN else run_cfg.run_dir)
    if run_cfg.recipe == "eval_rsa":
        from zaya_train.rsa.harness import PLOT_FILE, run_eval

        overlay = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
        summary = run_eval(run_cfg, run_dir, overlay_dir=overlay)
        accuracies = ", ".join(f"round {r['round']}: {r['mean_accuracy']:.3f}" for r in summary["rounds"])
        print(f"zaya-train: Markovian RSA mean accuracy {accuracies}; {summary['results']}, {run_dir / PLOT_FILE}")
        return
    if run_cfg.recipe == "build_aggregation_sft":
        from zaya_train.rsa.aggregation_sft import ProblemsFileError, build_aggregation_sft

        try:
            summary = build_aggregation_sft(run_cfg, run_dir)
        except ProblemsFileError as err:
            print(f"zaya-train: error: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        share = summary["share_correct"]
        correct = "" if share is None else f", {share:.1%} of those with an answer correct"
        print(f"zaya-train: wrote {summary['chats']} aggregation chats from {summary['problems']} problems "
              f"({sum(summary['skipped'].values())} rows skipped{correct}) to {summary['chats_file']}")
        return
    if run_cfg.recipe == "export":
        from zaya_train.train.export import export_checkpoint

        out = export_checkpoint(run_cfg.checkpoint, run_cfg.out)
        print(f"zaya-train: wrote an HF zaya checkpoint and its tokenizer to {out}")
        return
    if run_cfg.recipe == "plan":
        from zaya_train.model import preset
        from zaya_train.plan import run_plan

        run_plan(run_cfg.model.build(preset(run_cfg.model.preset).vocab_size, {}), run_cfg.plan, run_dir)
        print(f"zaya-train: wrote {run_dir / 'plan.json'}")
        return
    if run_cfg.recipe == "doctor":
        from zaya_train.doctor import run_doctor

        raise SystemExit(run_doctor(run_dir))
    if run_cfg.recipe in ("nano", "nano_cascade"):
        _multi_stage(run_cfg, run_dir)
        return
    from zaya_train.train.trainer import train

    run_dir = _rank0_run_dir(run_dir)
    run_cfg.run_dir = str(run_dir)
    with _run_errors():
        summary = train(run_cfg, run_dir, source_factory=source_factory(run_cfg.recipe))
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"zaya-train: {run_cfg.recipe} stopped at step {summary['step']} ({summary['reason']}), "
              f"loss {summary['loss']:.4f}; outputs in {run_dir}")


def _rank0_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory on every rank: the default `runs/${recipe}/${now:...}` is resolved in each process,
    and ranks that start in different seconds would otherwise write to different directories."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return run_dir
    import torch.distributed as dist

    from zaya_train.train.engine import init_distributed

    init_distributed()
    chosen = [str(run_dir)]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def source_factory(recipe: str):
    """The trainer's batch source for a training recipe."""
    if recipe == "rl":
        from zaya_train.rl.loop import RLSource

        return RLSource
    if recipe == "warmstart":
        from zaya_train.rl.warmstart import WarmStartSource

        return WarmStartSource
    from zaya_train.train.trainer import PretrainSource

    return PretrainSource


@contextlib.contextmanager
def _run_errors():
    """A config mistake found while running exits 2, a diverged run 1, each with one line on stderr."""
    from zaya_train.train.config import ConfigError
    from zaya_train.train.trainer import TrainingDiverged

    try:
        yield
    except ConfigError as err:
        print(f"zaya-train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except TrainingDiverged as err:
        print(f"zaya-train: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err


def _multi_stage(run_cfg, run_dir: Path) -> None:
    """The main job (recipe=nano) or the nano cascade: stages run in this process; a signal exits 128 + its number
    with the command that continues."""
    from zaya_train.jobs import StageInterrupted, interrupted_exit_code

    if run_cfg.recipe == "nano":
        from zaya_train.experiment.pipeline import run_main_job as run
    else:
        from zaya_train.cascade.pipeline import run_cascade as run
    try:
        with _run_errors():
            run(run_cfg, run_dir)
    except StageInterrupted as err:
        recipe = "" if run_cfg.recipe == "nano" else f"recipe={run_cfg.recipe} "
        print(f"zaya-train: {err}; continue with: zaya-train {recipe}trainer.resume=auto run_dir={run_dir}",
              file=sys.stderr)
        raise SystemExit(interrupted_exit_code(err)) from err


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _console_logging() -> None:
    """After Hydra has set up logging: our INFO lines on rank 0 only; other libraries' warnings and up."""
    import os

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("zaya_train").setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    import os
    import warnings

    import hydra

    if int(os.environ.get("RANK", "0")) != 0:
        warnings.simplefilter("ignore")  # console output comes from rank 0 only

    from zaya_train.train.config import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    recipe = DEFAULT_RECIPE
    rest = []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if recipe not in recipes():
        print(f"zaya-train: error: recipe: unknown recipe {recipe!r}, expected one of {recipes()}", file=sys.stderr)
        raise SystemExit(2)
    _register_schema()
    overrides = [a for a in rest if not a.startswith("-")]
    if "--validate" in rest:
        try:
            check_config(recipe, overrides)
        except ConfigError as err:
            print(f"zaya-train: error: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        print(f"zaya-train: the {recipe} config is valid")
        return
    informational = any(a in ("--help", "-h", "--hydra-help", "--info", "-i") or a.startswith("--cfg") for a in rest)
    if not informational:
        from zaya_train.kernels.linear import cpu_gemm_route

        try:
            cpu_gemm_route()
        except ValueError as err:
            print(f"zaya-train: error: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        try:
            check_config(recipe, overrides)
        except ConfigError as err:
            print(f"zaya-train: error: {err}", file=sys.stderr)
            raise SystemExit(2) from err
    atexit.register(_destroy_process_group)
    sys.argv = [sys.argv[0], *rest, f"hydra.searchpath=[file://{CONF_DIR}]"]
    hydra.main(version_base=None, config_path=str(RECIPES_DIR), config_name=recipe)(_task)()


if __name__ == "__main__":
    main()
