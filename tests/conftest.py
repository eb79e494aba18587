"""Shared fixtures. Tests run offline on the CPU in fp32 and write only under pytest's temporary directories."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _zaya_train(*args: str, cwd) -> None:
    """Runs `python -m zaya_train` as a user would (offline wandb off, no progress bar); fails the test on an error."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "zaya_train", "trainer.progress_bar=false", "wandb.mode=disabled",
                           *args], env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=cwd, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def nano_base_run(tmp_path_factory):
    """`zaya-train recipe=nano_pretrain` (seed 0, 500 steps, held-out evaluation), trained once per pytest session:
    the slow learning tests check it and start RL from it."""
    root = tmp_path_factory.mktemp("nano_base")
    _zaya_train("recipe=nano_pretrain", f"run_dir={root / 'run'}", cwd=root)
    return root / "run"


@pytest.fixture(scope="session")
def zaya_train():
    """`zaya_train(*overrides, cwd=...)` runs the command line as a user would and fails the test on an error."""
    return _zaya_train
