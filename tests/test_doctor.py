"""recipe=doctor (zaya_train/doctor.py) on a CPU machine: the report, the gloo all-reduce, the environment check.

    pytest tests/test_doctor.py

The GPU paths (nccl/rccl all-reduce, the bf16 GEMM) need a GPU node: `zaya-train recipe=doctor` there.
"""

import json

import pytest
import torch

from zaya_train.doctor import (
    compare_env,
    diagnose,
    environment,
    find_env_file,
    find_problems,
    format_report,
    parse_env_file,
    run_doctor,
)

ENV_FILE = """\
# launch/env/mi300x.sh-style: defaults the caller may override, and hard settings
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${NCCL_DEBUG:=WARN}"; export NCCL_DEBUG
if [[ "${NPROC_PER_NODE:-}" =~ ^[0-9]+$ ]]; then
    : "${OMP_NUM_THREADS:=$(( $(nproc) / NPROC_PER_NODE ))}"; export OMP_NUM_THREADS
fi
: "${HSA_NO_SCRATCH_RECLAIM:=1}"; export HSA_NO_SCRATCH_RECLAIM
export GPU_MAX_HW_QUEUES=2
export PYTORCH_HIP_ALLOC_CONF="expandable_segments:True"   # quoted
TORCH_NCCL_HIGH_PRIORITY=1
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$(ip route | awk '/default/ {print $5}')}"
export MASTER_ADDR=$SLURM_MASTER_ADDR
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU verdict")
def test_cpu_node_says_no_gpu_runs_gloo_and_exits_1(tmp_path, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = run_doctor(tmp_path)
    out = capsys.readouterr().out
    assert code == 1
    assert "no GPU" in out and "torch" in out and "deepspeed" in out
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["exit_code"] == 1 and report["gpus"] == []
    allreduce = report["allreduce"]
    assert allreduce["backend"] == "gloo" and allreduce["world_size"] == 2 and allreduce["correct"]
    assert allreduce["busbw_GBps"] > 0 and allreduce["algbw_GBps"] > 0 and allreduce["latency_us"] > 0
    row = next(line for line in out.splitlines() if line.startswith("all-reduce"))
    assert "gloo" in row and "GB/s" in row and "latency" in row
    assert any(line.startswith("problem: no GPU") for line in out.splitlines())
    assert out.strip().splitlines()[-1].startswith("doctor: NOT usable")


COMMON = """\
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"; export TORCH_NCCL_ASYNC_ERROR_HANDLING
: "${NCCL_DEBUG:=INFO}"; export NCCL_DEBUG   # the first default wins, as in bash
export GPU_MAX_HW_QUEUES=4                     # the file that sources this one exports 2 later: 2 wins
export NCCL_PROTO="${NCCL_PROTO:-Simple}"
"""


def _write_env(tmp_path):
    (tmp_path / "common.sh").write_text(COMMON)
    path = tmp_path / "mi300x.sh"
    path.write_text(ENV_FILE)
    return path


def test_parse_env_file_reads_defaults_and_exports(tmp_path):
    path = _write_env(tmp_path)
    assert parse_env_file(path) == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "NCCL_DEBUG": "INFO",
        "NCCL_PROTO": "Simple",
        "HSA_NO_SCRATCH_RECLAIM": "1",
        "GPU_MAX_HW_QUEUES": "2",
        "PYTORCH_HIP_ALLOC_CONF": "expandable_segments:True",
        "TORCH_NCCL_HIGH_PRIORITY": "1",
        # NCCL_SOCKET_IFNAME, MASTER_ADDR and OMP_NUM_THREADS are computed at launch: nothing fixed to compare
        # with; NPROC_PER_NODE is only read.
    }


def test_env_comparison_flags_the_variable_that_differs(tmp_path):
    path = tmp_path / "mi300x.sh"
    path.write_text(ENV_FILE)  # its common.sh is absent: the source line is skipped
    current = {"NCCL_DEBUG": "INFO", "GPU_MAX_HW_QUEUES": "2", "HSA_NO_SCRATCH_RECLAIM": "1"}
    env = environment(path, current)
    assert env["differs"] == [("NCCL_DEBUG", "INFO", "WARN")]
    assert env["unset"] == ["PYTORCH_HIP_ALLOC_CONF", "TORCH_NCCL_HIGH_PRIORITY"]
    assert compare_env(current, {"NCCL_DEBUG": "INFO"}) == {"differs": [], "unset": []}


def test_env_file_in_the_report_one_warning_per_differing_variable(tmp_path, monkeypatch):
    path = tmp_path / "mi300x.sh"
    path.write_text(ENV_FILE)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("GPU_MAX_HW_QUEUES", "2")
    report = diagnose(env_file=path, allreduce=False)
    text = format_report(report)
    differing = [line for line in text.splitlines() if line.startswith("warning: NCCL_DEBUG=INFO differs")]
    assert len(differing) == 1 and "WARN" in differing[0]
    assert not any("GPU_MAX_HW_QUEUES" in w and "differs" in w for w in report["warnings"])
    assert any(line.startswith("GPU_MAX_HW_QUEUES") and "matches" in line for line in text.splitlines())


def test_missing_env_file_is_tolerated(tmp_path):
    assert find_env_file("rocm", roots=[tmp_path]) is None
    assert find_env_file("cpu", roots=[tmp_path]) is None
    (tmp_path / "launch" / "env").mkdir(parents=True)
    (tmp_path / "launch" / "env" / "cuda.sh").write_text(ENV_FILE)
    assert find_env_file("cuda", roots=[tmp_path]) == tmp_path / "launch" / "env" / "cuda.sh"


def _gpu_report(**changes):
    """A hand-made report of a ROCm node with one GPU (find_problems and format_report only read the dict)."""
    report = {
        "host": "node0",
        "platform": "rocm",
        "launch": {"world_size": 1, "local_world_size": 1, "rank": 0, "local_rank": 0},
        "versions": {"python": "3.11", "torch": "2.9.0+rocm6.4", "hip": "6.4", "cuda": None, "nccl": "2.22.3",
                     "nccl_backend": True, "deepspeed": "0.19.8", "deepspeed_error": None, "flash_attn": None,
                     "triton": None},
        "gpus": [{"index": 0, "name": "AMD Instinct MI300X", "arch": "gfx942", "total_memory_bytes": 192 * 2**30,
                  "free_memory_bytes": 191 * 2**30}],
        "env": {"file": None, "current": {}, "recommended": {}, "differs": [], "unset": []},
        "deepspeed_ops": {"fused_adam": True},
        "allreduce": {"backend": "nccl", "world_size": 1, "bytes": 2**28, "dtype": "bfloat16", "correct": True,
                      "latency_us": 20.0, "time_per_op_ms": 0.1, "algbw_GBps": 2000.0, "busbw_GBps": 0.0,
                      "mode": "1 spawned rank(s) on loopback"},
        "gemm": {"size": 8192, "tflops": 700.0, "peak_tflops": 1307.4, "fraction_of_peak": 0.54, "finite": True},
    }
    report.update(changes)
    return report


def test_problem_lines_are_one_per_problem():
    healthy = _gpu_report(env={"file": "launch/env/mi300x.sh", "current": {}, "recommended": {}, "differs": [],
                               "unset": []})
    problems, warnings = find_problems(healthy)
    assert problems == [] and warnings == []
    broken = _gpu_report(
        allreduce={"error": "RuntimeError: NCCL error\nunhandled system error\n(details)"},
        gemm={"size": 8192, "tflops": 100.0, "peak_tflops": 1307.4, "fraction_of_peak": 0.08, "finite": False},
        versions={**healthy["versions"], "deepspeed": None, "deepspeed_error": "ImportError: no module"},
    )
    problems, warnings = find_problems(broken)
    assert len(problems) == 3  # the all-reduce, the non-finite GEMM, DeepSpeed
    assert any("slow" in w or "TFLOP/s" in w for w in warnings)  # a slow GEMM warns, it does not fail
    text = format_report({**broken, "problems": problems, "warnings": warnings})
    lines = text.splitlines()
    problem_lines = [line for line in lines if line.startswith("problem: ")]
    assert problem_lines == [f"problem: {p}" for p in problems]
    assert all("\n" not in p for p in problems)
    assert "NCCL error unhandled system error" in text
    assert lines[-1] == "doctor: NOT usable for GPU training (3 problem(s))"
