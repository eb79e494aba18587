"""`recipe=doctor`: is this node ready for GPU training? Versions, GPUs, environment, a collective test, a GEMM.

    zaya-train recipe=doctor                                   # one process: spawns the all-reduce ranks itself
    torchrun --nproc_per_node=8 -m zaya_train recipe=doctor    # the launched ranks run the all-reduce together
    python -c "from zaya_train.doctor import run_doctor; raise SystemExit(run_doctor())"

It prints one table (torch, ROCm/HIP or CUDA, RCCL/NCCL, DeepSpeed and flash-attn versions; GPU count, names and
memory; the environment variables that matter, next to what `launch/env/mi300x.sh` (ROCm) or `launch/env/cuda.sh`
(CUDA) recommends; an all-reduce bandwidth and latency figure; DeepSpeed op compatibility; a bf16 GEMM TFLOP/s
against the device's peak), then one line per problem and per warning. `run_doctor` returns 0 when the node is
usable for GPU training and 1 when it is not; problems say why. Warnings (an environment variable that differs
from the launch file, a slow GEMM) never change the exit code. With a run directory it also writes doctor.json.

The all-reduce runs over:
- the launched ranks under torchrun (WORLD_SIZE set): all of them, nccl (RCCL on ROCm) on GPUs, else gloo;
- alone with two or more GPUs: one spawned nccl rank per local GPU (up to 8);
- alone with one GPU: one spawned nccl rank (checks that the communicator comes up; no link is measured);
- alone without a GPU: two spawned gloo ranks on loopback (127.0.0.1), so the collective path is still exercised.
Bus bandwidth follows the nccl-tests convention: bytes / time * 2 (n - 1) / n for an all-reduce over n ranks;
latency is the median time of a one-element all-reduce.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import platform
import re
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zaya_train.train.metrics import PEAK_BF16_FLOPS

# Variables that change how collectives, the HIP/CUDA runtime and the allocator behave (anchors: ROCm
# Megatron-LM, Primus, torchtitan launch scripts); a launch env file may add more.
ENV_VARS = (
    "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "NCCL_CROSS_NIC",
    "NCCL_PROTO", "NCCL_ALGO", "NCCL_CHECKS_DISABLE", "NCCL_PXN_DISABLE", "NCCL_P2P_NET_CHUNKSIZE",
    "RCCL_MSCCL_ENABLE", "RCCL_MSCCLPP_ENABLE", "TORCH_NCCL_HIGH_PRIORITY", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "GPU_MAX_HW_QUEUES", "CUDA_DEVICE_MAX_CONNECTIONS", "HSA_NO_SCRATCH_RECLAIM", "HSA_ENABLE_SDMA", "HSA_XNACK",
    "HSA_FORCE_FINE_GRAIN_PCIE", "HIP_FORCE_DEV_KERNARG", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF",
    "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_TUNABLEOP_ENABLED", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
)
ENV_FILES = {"rocm": "mi300x.sh", "cuda": "cuda.sh"}
GEMM_SIZE = 8192
SLOW_GEMM_FRACTION = 0.35  # of the dense bf16 peak; tuned hipBLASLt/cuBLAS reach well over half on these shapes
ALLREDUCE_BYTES = {"gloo": 16 * 2**20, "nccl": 256 * 2**20}
ALLREDUCE_ITERS = {"gloo": 5, "nccl": 20}
LATENCY_ITERS = 20
SPAWN_TIMEOUT_S = 180.0
MAX_SPAWNED_GPU_RANKS = 8


# ---------------------------------------------------------------------------------------------------------------
# Versions and devices


def gpu_platform() -> str:
    """"rocm" (a HIP build of torch), "cuda", or "cpu" (a torch without GPU support)."""
    if getattr(torch.version, "hip", None):
        return "rocm"
    return "cuda" if torch.version.cuda else "cpu"


def _package_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences Python-level and fd-level stdout/stderr and DeepSpeed's logger (its import and op probes print
    accelerator warnings and compiler checks)."""
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    saved = []
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                saved.append((fd, os.dup(fd)))
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd, _ in saved:
            os.dup2(devnull, fd)
        os.close(devnull)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        ds_logger.setLevel(level)


def versions() -> dict[str, str | None]:
    """torch, HIP/CUDA, RCCL/NCCL, DeepSpeed (None when it does not import), flash-attn, triton, python."""
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hip": getattr(torch.version, "hip", None),
        "cuda": torch.version.cuda,
        "nccl": None,
        "nccl_backend": dist.is_available() and dist.is_nccl_available(),
        "deepspeed": None,
        "deepspeed_error": None,
        "flash_attn": _package_version("flash_attn", "flash-attn"),
        "triton": _package_version("triton", "pytorch-triton-rocm"),
    }
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a torch built without NCCL/RCCL
            nccl = torch.cuda.nccl.version()
            out["nccl"] = ".".join(str(v) for v in nccl) if isinstance(nccl, tuple) else str(nccl)
    try:
        with _quiet():
            import deepspeed
        out["deepspeed"] = deepspeed.__version__
    except Exception as err:  # noqa: BLE001 - an import that fails for any reason is the finding
        out["deepspeed_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
    return out


def gpus(own_device_only: bool = False) -> list[dict[str, Any]]:
    """Name, architecture, total and free memory of every visible GPU (empty on a CPU machine). Free memory needs
    a context on the device; with `own_device_only` (one rank of several on the node) only this rank's device
    (LOCAL_RANK) is queried, so eight ranks do not each open a context on all eight GPUs."""
    if not torch.cuda.is_available():
        return []
    own = int(os.environ.get("LOCAL_RANK", "0"))
    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free = total = None
        if not own_device_only or index == own:
            free, total = torch.cuda.mem_get_info(index)
        arch = getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}"
        out.append({"index": index, "name": props.name, "arch": arch,
                    "total_memory_bytes": int(total if total is not None else props.total_memory),
                    "free_memory_bytes": None if free is None else int(free)})
    return out


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak for a device name (the trainer's MFU table), None for an unknown device."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)


def deepspeed_ops() -> dict[str, bool] | None:
    """`is_compatible()` of every DeepSpeed op builder for this accelerator, probed quietly; None when DeepSpeed
    does not import."""
    try:
        with _quiet():
            from deepspeed.ops.op_builder.all_ops import ALL_OPS

            result = {}
            for name, builder in sorted(ALL_OPS.items()):
                try:
                    result[name] = bool(builder.is_compatible(False))
                except Exception:  # noqa: BLE001 - a probe that raises means "cannot build here", as ds_report has it
                    result[name] = False
    except Exception:  # noqa: BLE001 - DeepSpeed missing or broken: reported by `versions`
        return None
    return result


# ---------------------------------------------------------------------------------------------------------------
# Environment


_DEFAULT_ASSIGN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?=([^}]*)\}")
_ASSIGN = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_SELF_DEFAULT = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]*)\}$")
_SOURCE = re.compile(r"^(?:source|\.)\s+(.+)$")
_SCRIPT_DIR = re.compile(r"""\$\(dirname\s+"?\$\{?BASH_SOURCE(?:\[0\])?\}?"?\)""")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_env_file(path: str | Path, _depth: int = 0) -> dict[str, str]:
    """Recommended values from a shell env file, as bash would leave them: `: "${NAME:=VALUE}"` (a default: the
    first one set wins), `export NAME="${NAME:-VALUE}"`, `export NAME=VALUE` and `NAME=VALUE` (the last one wins),
    following `source "$(dirname "${BASH_SOURCE[0]}")/other.sh"` and `source other.sh` (relative to the file).
    Comments, uses such as `[[ "${NAME:-}" ]]`, and values computed at launch (`$(...)`, `$OTHER`) are skipped:
    there is nothing fixed to compare them with."""
    path = Path(path).resolve()
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for statement in (s.strip() for s in line.split(";")):
            sourced = _SOURCE.match(statement)
            if sourced and _depth < 4:
                target = _SCRIPT_DIR.sub(lambda _: str(path.parent), sourced.group(1)).replace('"', "").strip()
                target_path = Path(target) if Path(target).is_absolute() else path.parent / target
                if "$" not in target and target_path.is_file():
                    for name, value in parse_env_file(target_path, _depth + 1).items():
                        found[name] = value
                continue
            default = _DEFAULT_ASSIGN.search(statement)
            plain = _ASSIGN.match(statement)
            if default and not plain:
                name, value, first_wins = default.group(1), _unquote(default.group(2)), True
            elif plain:
                name, value, first_wins = plain.group(1), _unquote(plain.group(2)), False
                self_default = _SELF_DEFAULT.match(value)
                if self_default and self_default.group(1) == name:
                    value, first_wins = _unquote(self_default.group(2)), True
            else:
                continue
            if "$" in value or "`" in value or (first_wins and name in found):
                continue
            found[name] = value
    return found


def find_env_file(gpu_kind: str, roots: list[Path] | None = None) -> Path | None:
    """`launch/env/mi300x.sh` (ROCm) or `launch/env/cuda.sh` (CUDA) under the working directory or the repository
    holding this package; None on a CPU machine or where the file does not exist."""
    name = ENV_FILES.get(gpu_kind)
    if name is None:
        return None
    roots = roots if roots is not None else [Path.cwd(), Path(__file__).resolve().parents[1]]
    return next((root / "launch" / "env" / name for root in roots if (root / "launch" / "env" / name).is_file()), None)


def compare_env(current: Mapping[str, str], recommended: Mapping[str, str]) -> dict[str, Any]:
    """`differs`: [(name, current value, recommended value)] for variables set to something else; `unset`: the
    recommended variables not set at all (the launch script would set them)."""
    differs = [(name, current[name], value) for name, value in sorted(recommended.items())
               if name in current and current[name] != value]
    unset = sorted(name for name in recommended if name not in current)
    return {"differs": differs, "unset": unset}


def environment(env_file: Path | None, current: Mapping[str, str] | None = None) -> dict[str, Any]:
    current = dict(os.environ if current is None else current)
    recommended = parse_env_file(env_file) if env_file is not None else {}
    names = sorted(set(ENV_VARS) | set(recommended))
    return {
        "file": str(env_file) if env_file is not None else None,
        "current": {name: current[name] for name in names if name in current},
        "recommended": recommended,
        **compare_env(current, recommended),
    }


# ---------------------------------------------------------------------------------------------------------------
# Collective and GEMM benchmarks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allreduce_benchmark(device: torch.device, nbytes: int, iters: int, group: Any = None) -> dict[str, Any]:
    """Runs on every rank of an initialised process group; returns the slowest rank's figures (all ranks agree).
    Checks the sum first, then times a one-element all-reduce (latency, median) and `iters` back-to-back
    all-reduces of `nbytes` (bf16 on GPU, fp32 on CPU)."""
    world = dist.get_world_size(group)
    check = torch.ones(4, device=device)
    dist.all_reduce(check, group=group)
    correct = bool(torch.all(check == world).item())

    one = torch.zeros(1, device=device)
    for _ in range(3):
        dist.all_reduce(one, group=group)
    _sync(device)
    samples = []
    for _ in range(LATENCY_ITERS):
        start = time.perf_counter()
        dist.all_reduce(one, group=group)
        _sync(device)
        samples.append(time.perf_counter() - start)
    latency = statistics.median(samples)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = torch.zeros(nbytes * 8 // torch.finfo(dtype).bits, dtype=dtype, device=device)
    dist.all_reduce(data, group=group)  # warm-up: buffers and algorithm selection
    _sync(device)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(data, group=group)
    _sync(device)
    per_op = (time.perf_counter() - start) / iters

    slowest = torch.tensor([latency, per_op], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    latency, per_op = slowest.tolist()
    size = data.numel() * data.element_size()
    algbw = size / per_op
    return {
        "backend": dist.get_backend(group),
        "world_size": world,
        "bytes": size,
        "dtype": str(dtype).removeprefix("torch."),
        "correct": correct,
        "latency_us": latency * 1e6,
        "time_per_op_ms": per_op * 1e3,
        "algbw_GBps": algbw / 1e9,
        "busbw_GBps": algbw * 2 * (world - 1) / world / 1e9,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawned_rank(rank: int, world: int, init_method: str, backend: str, result_path: str) -> None:
    """One spawned rank of the single-process mode (module level: the spawn start method imports it)."""
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = allreduce_benchmark(device, ALLREDUCE_BYTES[backend], ALLREDUCE_ITERS[backend])
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn_allreduce(world: int, backend: str, timeout_s: float = SPAWN_TIMEOUT_S) -> dict[str, Any]:
    """Spawns `world` local ranks on loopback (torch.multiprocessing, spawn start method), runs the all-reduce
    benchmark and returns rank 0's figures; raises RuntimeError when a rank fails or time runs out."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "allreduce.json"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.start_processes(_spawned_rank, args=(world, init_method, backend, str(result_path)),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {world} spawned {backend} ranks did not finish within {timeout_s:.0f} s")
        except Exception as err:
            for process in context.processes:  # only the processes this function started
                if process.is_alive():
                    process.terminate()
            message = str(err).strip().splitlines()
            raise RuntimeError(message[-1] if message else type(err).__name__) from err
        result = json.loads(result_path.read_text())
    result["mode"] = f"{world} spawned rank(s) on loopback"
    return result


def launched_allreduce() -> dict[str, Any]:
    """The all-reduce over the ranks torchrun launched (a process group already set up is reused)."""
    use_gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    created = not dist.is_initialized()
    if created:
        if use_gpu:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_gpu else "gloo", timeout=datetime.timedelta(seconds=120))
    try:
        backend = dist.get_backend()
        result = allreduce_benchmark(device, ALLREDUCE_BYTES.get(backend, ALLREDUCE_BYTES["gloo"]),
                                     ALLREDUCE_ITERS.get(backend, ALLREDUCE_ITERS["gloo"]))
    finally:
        if created:
            dist.destroy_process_group()
    result["mode"] = f"{result['world_size']} launched rank(s)"
    return result


def run_allreduce(num_gpus: int) -> dict[str, Any]:
    """Chooses the ranks (module doc) and runs the test; {"error": ...} when it fails."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or dist.is_initialized():
            return launched_allreduce()
        if num_gpus >= 1:
            return spawn_allreduce(min(num_gpus, MAX_SPAWNED_GPU_RANKS), "nccl")
        return spawn_allreduce(2, "gloo")
    except Exception as err:  # noqa: BLE001 - the failure is the finding; the report says which
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0]}


def gemm_benchmark(device: torch.device, size: int = GEMM_SIZE, iters: int = 20) -> dict[str, Any]:
    """bf16 [size x size] @ [size x size] on one GPU: TFLOP/s (2 size^3 per product, CUDA/HIP events) and the
    fraction of the device's dense bf16 peak."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        out = a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        out = a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    tflops = 2 * size**3 / seconds / 1e12
    peak = peak_bf16_flops(torch.cuda.get_device_name(device))
    return {
        "size": size,
        "tflops": tflops,
        "peak_tflops": peak / 1e12 if peak else None,
        "fraction_of_peak": tflops * 1e12 / peak if peak else None,
        "finite": bool(torch.isfinite(out).all().item()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report


def find_problems(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, warnings). A problem makes the node unusable for GPU training (exit code 1); a warning does not.
    Each is one line."""
    problems: list[str] = []
    warnings: list[str] = []
    v, devices = report["versions"], report["gpus"]
    if not devices:
        kind = "a CPU-only torch build" if report["platform"] == "cpu" else "torch sees no device"
        problems.append(f"no GPU: {kind} (torch {v['torch']}); GPU training needs ROCm or CUDA GPUs")
    if v["deepspeed"] is None:
        problems.append(f"deepspeed does not import: {v['deepspeed_error']}")
    if devices and not v["nccl_backend"]:
        problems.append("torch.distributed has no NCCL/RCCL backend: GPU ranks cannot all-reduce")
    local = report["launch"]["local_world_size"]
    if devices and local > len(devices):
        problems.append(f"torchrun launched {local} ranks on this node but only {len(devices)} GPUs are visible")
    ar = report["allreduce"]
    if ar is None:
        pass  # not run (diagnose(allreduce=False))
    elif "error" in ar:
        problems.append(f"all-reduce test failed: {ar['error']}")
    elif not ar["correct"]:
        problems.append(f"all-reduce over {ar['world_size']} ranks ({ar['backend']}) returned a wrong sum")
    gemm = report["gemm"]
    if gemm is not None and "error" in gemm:
        problems.append(f"bf16 GEMM failed: {gemm['error']}")
    elif gemm is not None:
        if not gemm["finite"]:
            problems.append("bf16 GEMM produced non-finite values")
        if gemm["fraction_of_peak"] is None:
            warnings.append(f"no bf16 peak known for {devices[0]['name']}: GEMM efficiency not judged")
        elif gemm["fraction_of_peak"] < SLOW_GEMM_FRACTION:
            warnings.append(
                f"bf16 GEMM reached {gemm['tflops']:.0f} TFLOP/s, {gemm['fraction_of_peak']:.0%} of the "
                f"{gemm['peak_tflops']:.0f} peak (expected over {SLOW_GEMM_FRACTION:.0%}): check clocks, other jobs, "
                "hipBLASLt/cuBLAS tuning"
            )
    for gpu in devices:
        if gpu["free_memory_bytes"] is not None and gpu["free_memory_bytes"] < 0.9 * gpu["total_memory_bytes"]:
            used = (gpu["total_memory_bytes"] - gpu["free_memory_bytes"]) / 2**30
            warnings.append(f"GPU {gpu['index']} already has {used:.1f} GiB in use (another process?)")
    ops = report["deepspeed_ops"]
    if devices and ops is not None and ops.get("fused_adam") is False:
        warnings.append("DeepSpeed's fused_adam op is not compatible here (a torch optimizer will be used)")
    env = report["env"]
    for name, current, recommended in env["differs"]:
        warnings.append(f"{name}={current} differs from {env['file']}, which sets {recommended}")
    if env["unset"]:
        warnings.append(
            f"{len(env['unset'])} variable(s) {env['file']} sets are unset here (source it before training): "
            + ", ".join(env["unset"])
        )
    if report["platform"] in ENV_FILES and env["file"] is None:
        warnings.append(f"no launch/env/{ENV_FILES[report['platform']]} found to compare the environment with")
    # One line each, whatever an error message carried.
    return [" ".join(p.split()) for p in problems], [" ".join(w.split()) for w in warnings]


def diagnose(env_file: str | Path | None = None, allreduce: bool = True) -> dict[str, Any]:
    """Every check, as a JSON-ready dict. `env_file`: the launch env file to compare with (default: the one for
    this platform, `find_env_file`); `allreduce=False` skips the collective test (it is then not judged)."""
    kind = gpu_platform()
    devices = gpus(own_device_only=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    env_path = Path(env_file) if env_file is not None else find_env_file(kind)
    report: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": kind,
        "launch": {name.lower(): int(os.environ.get(name, default)) for name, default in
                   (("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"))},
        "versions": versions(),
        "gpus": devices,
        "env": environment(env_path),
        "deepspeed_ops": deepspeed_ops(),
        "allreduce": run_allreduce(len(devices)) if allreduce else None,
        "gemm": None,
    }
    if devices:
        try:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % len(devices))
            report["gemm"] = gemm_benchmark(device)
        except Exception as err:  # noqa: BLE001 - the failure is the finding
            report["gemm"] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    report["problems"], report["warnings"] = find_problems(report)
    report["exit_code"] = 1 if report["problems"] else 0
    return report


def _allreduce_row(ar: dict[str, Any] | None) -> str:
    if ar is None:
        return "- (skipped)"
    if "error" in ar:
        return f"FAILED: {ar['error']}"
    return (f"{ar['backend']}, {ar['mode']}: {ar['bytes'] / 2**20:.0f} MiB {ar['dtype']} in {ar['time_per_op_ms']:.2f} ms"
            f" = bus {ar['busbw_GBps']:.2f} GB/s (alg {ar['algbw_GBps']:.2f} GB/s); latency {ar['latency_us']:.0f} us")


def format_report(report: dict[str, Any]) -> str:
    """One table, then one line per problem and per warning, then the verdict."""
    v, devices, env = report["versions"], report["gpus"], report["env"]
    collective = "RCCL" if v["hip"] else "NCCL"
    rows = [
        ("host", f"{report['host']} ({report['platform']})"),
        ("python", v["python"]),
        ("torch", f"{v['torch']} (HIP {v['hip'] or '-'}, CUDA {v['cuda'] or '-'})"),
        (collective, v["nccl"] or "-"),
        ("deepspeed", v["deepspeed"] or f"does not import ({v['deepspeed_error']})"),
        ("flash-attn", v["flash_attn"] or "not installed (attention runs on SDPA)"),
        ("triton", v["triton"] or "-"),
        ("GPUs", f"{len(devices)}" if devices else "0 (no GPU)"),
    ]
    for gpu in devices:
        free = "" if gpu["free_memory_bytes"] is None else f", {gpu['free_memory_bytes'] / 2**30:.1f} GiB free"
        memory = f"{gpu['total_memory_bytes'] / 2**30:.1f} GiB{free}"
        rows.append((f"GPU {gpu['index']}", f"{gpu['name']} ({gpu['arch']}), {memory}"))
    rows.append(("all-reduce", _allreduce_row(report["allreduce"])))
    gemm = report["gemm"]
    if gemm is None:
        rows.append(("bf16 GEMM", "- (no GPU)"))
    elif "error" in gemm:
        rows.append(("bf16 GEMM", f"FAILED: {gemm['error']}"))
    else:
        peak = f", {gemm['fraction_of_peak']:.0%} of {gemm['peak_tflops']:.0f} peak" if gemm["peak_tflops"] else ""
        rows.append(("bf16 GEMM", f"{gemm['size']}^3: {gemm['tflops']:.0f} TFLOP/s{peak}"))
    ops = report["deepspeed_ops"]
    if ops is None:
        rows.append(("deepspeed ops", "-"))
    else:
        missing = [name for name, ok in ops.items() if not ok]
        rows.append(("deepspeed ops", f"{len(ops) - len(missing)}/{len(ops)} compatible"
                     + (f"; not: {', '.join(missing)}" if missing else "")))
    rows.append(("launch env file", env["file"] or "none for this platform"))
    for name, value in env["current"].items():
        recommended = env["recommended"].get(name)
        note = "" if recommended is None else " (matches the launch file)" if recommended == value else \
            f" (launch file: {recommended})"
        rows.append((name, f"{value}{note}"))
    if not env["current"]:
        rows.append(("env", f"none of the {len(ENV_VARS)} variables that matter is set"))
    width = max(len(key) for key, _ in rows)
    lines = ["zaya-train doctor", "-" * 72] + [f"{key:<{width}}  {value}" for key, value in rows] + ["-" * 72]
    lines += [f"problem: {p}" for p in report["problems"]]
    lines += [f"warning: {w}" for w in report["warnings"]]
    if report["problems"]:
        lines.append(f"doctor: NOT usable for GPU training ({len(report['problems'])} problem(s))")
    else:
        lines.append("doctor: usable for GPU training")
    return "\n".join(lines)


def run_doctor(run_dir: str | Path | None = None, env_file: str | Path | None = None) -> int:
    """`recipe=doctor`: runs every check, prints the report (rank 0 under torchrun; other ranks print only their
    problems), writes `run_dir/doctor.json` when `run_dir` is given (rank 0), and returns the exit code: 0 when
    the node is usable for GPU training, 1 when not."""
    report = diagnose(env_file)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(format_report(report), flush=True)
        if run_dir is not None:
            path = Path(run_dir)
            path.mkdir(parents=True, exist_ok=True)
            (path / "doctor.json").write_text(json.dumps(report, indent=2) + "\n")
    else:
        for problem in report["problems"]:
            print(f"[rank {rank} {report['host']}] problem: {problem}", flush=True)
    return report["exit_code"]
