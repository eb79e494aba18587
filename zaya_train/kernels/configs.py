"""Launch configurations of the Triton kernels, kept as data: one JSON file per device family in `configs/`.

    cfg = launch_config("rms_norm_fwd", size=2048, device=x.device)
    kernel[grid](..., **cfg.meta, **cfg.options)  # meta: tl.constexpr block sizes; options: compiler knobs
    cfg.host["programs_per_sm"]                    # host-side values (grid shape, chunk sizes)

A device file names the devices it serves by substrings of `torch.cuda.get_device_name()` ("MI300X" matches
"AMD Instinct MI300X"), its backend ("hip" or "cuda") and architecture ("gfx942", "sm_90": what `python -m
zaya_train.kernels.compile_check` compiles the entries for, offline, with no GPU), and per kernel a table
keyed by problem size (the hidden size for the norms, the vocabulary for the cross-entropy, the head dim for
CCA); a launch takes the entry with the smallest key >= its size, else the largest. Every entry is merged over
the built-in `DEFAULTS`, so a file may set a single knob, and a device with no file (or a CPU under the Triton
interpreter, which ignores compiler options) runs on the defaults alone.

Keys, checked when a file is loaded (a typo fails at start, naming the file and key):
- UPPER_CASE: `tl.constexpr` meta-parameters of the kernel (BLOCK_N, BLOCK_D, BLOCK_V);
- compiler options of the file's backend: hip `num_warps`, `num_stages`, `waves_per_eu` (occupancy target per
  SIMD), `matrix_instr_nonkdim` and `kpack` (MFMA shape and operand packing, which only affect kernels with
  `tl.dot`); cuda `num_warps`, `num_stages`, `num_ctas`, `maxnreg`;
- host keys: `programs_per_sm` (backward grid = that many programs per CU/SM, each reducing its rows' column
  sums), `chunk_tokens` (tokens per LM-head chunk).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).parent / "configs"

BACKEND_OPTIONS = {
    "hip": frozenset({"num_warps", "num_stages", "waves_per_eu", "matrix_instr_nonkdim", "kpack"}),
    "cuda": frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"}),
}
HOST_KEYS = frozenset({"programs_per_sm", "chunk_tokens"})

# Portable starting points, used wherever a device file says nothing (and on the CPU under the interpreter).
# Sized by hidden size / vocabulary like the files: compiled offline for gfx942 and sm_90, these keep the
# whole row in registers without spilling up to D = 2048 (wider rows spill a little in the CUDA backward).
DEFAULTS: dict[str, dict[int, dict[str, Any]]] = {
    "rms_norm_fwd": {
        256: {"BLOCK_N": 8, "num_warps": 4},
        1024: {"BLOCK_N": 2, "num_warps": 8},
        2048: {"BLOCK_N": 1, "num_warps": 8},
        8192: {"BLOCK_N": 1, "num_warps": 16},
    },
    "rms_norm_bwd": {
        128: {"BLOCK_N": 8, "num_warps": 8, "programs_per_sm": 4},
        256: {"BLOCK_N": 4, "num_warps": 8, "programs_per_sm": 4},
        1024: {"BLOCK_N": 2, "num_warps": 8, "programs_per_sm": 4},
        2048: {"BLOCK_N": 1, "num_warps": 16, "programs_per_sm": 4},
        8192: {"BLOCK_N": 1, "num_warps": 32, "programs_per_sm": 4},
    },
    "softmax_ce": {
        32768: {"BLOCK_V": 2048, "num_warps": 4},
        262144: {"BLOCK_V": 4096, "num_warps": 8},
    },
    "lm_head": {
        262144: {"chunk_tokens": 1024},
    },
    # CCA q/k path (zaya_train.kernels.cca), keyed by the head dim: one head's [BLOCK_S, d] tile per program.
    "cca_fwd": {
        128: {"BLOCK_S": 32, "BLOCK_K": 32, "num_warps": 4},
    },
    "cca_bwd_norm": {
        128: {"BLOCK_S": 32, "BLOCK_K": 32, "num_warps": 8},
    },
    "cca_bwd_input": {
        128: {"BLOCK_S": 32, "BLOCK_K": 32, "num_warps": 8},
    },
    "cca_bwd_weight": {
        128: {"BLOCK_S": 32, "num_warps": 8, "programs_per_sm": 2},
    },
    # MoE experts (zaya_train.kernels.moe), keyed by the hidden size (moe_permute: by the token count).
    "moe_permute": {
        65536: {"BLOCK_T": 256, "num_warps": 4},
    },
    "moe_gate_up": {
        2048: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8},
    },
    "moe_down": {
        2048: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4},
    },
    "moe_down_bwd": {
        2048: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8},
    },
    "moe_wgrad": {
        2048: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4},
    },
}


def _by_size(table: dict[int, dict[str, Any]], size: int) -> dict[str, Any]:
    """The entry with the smallest key >= size, else the largest key's."""
    if not table:
        return {}
    keys = sorted(table)
    return table[next((k for k in keys if k >= size), keys[-1])]


@dataclass(frozen=True)
class LaunchConfig:
    meta: dict[str, int] = field(default_factory=dict)  # tl.constexpr meta-parameters
    options: dict[str, int] = field(default_factory=dict)  # compiler options (num_warps, waves_per_eu, ...)
    host: dict[str, int] = field(default_factory=dict)  # read by the launcher, never passed to the kernel
    source: str = "defaults"  # the device file the entry came from, for the log


@dataclass(frozen=True)
class DeviceConfigs:
    name: str  # file stem ("mi300x") or "defaults"
    backend: str | None
    arch: str | None  # "gfx942", "sm_90": the offline compile check's target
    kernels: dict[str, dict[int, dict[str, Any]]]


def _check_entry(entry: dict[str, Any], backend: str | None, where: str) -> None:
    allowed = BACKEND_OPTIONS.get(backend, frozenset()) | HOST_KEYS | {"num_warps", "num_stages"}
    for key, value in entry.items():
        if not key.isupper() and key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} (backend {backend!r} accepts {sorted(allowed)} "
                             "and UPPER_CASE block sizes)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {key} must be a non-negative integer, got {value!r}")


def load_device_file(path: Path) -> tuple[list[str], DeviceConfigs]:
    """(device name substrings, configs) of one JSON file; ValueError naming the file for a malformed one."""
    data = json.loads(path.read_text())
    unknown = set(data) - {"_doc", "devices", "backend", "arch", "kernels"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    backend = data.get("backend")
    if backend not in BACKEND_OPTIONS:
        raise ValueError(f"{path}: backend must be one of {sorted(BACKEND_OPTIONS)}, got {backend!r}")
    arch = data.get("arch")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{path}: arch must name the GPU architecture ('gfx942', 'sm_90'), got {arch!r}")
    devices = data.get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
        raise ValueError(f"{path}: devices must be a non-empty list of device-name substrings")
    kernels: dict[str, dict[int, dict[str, Any]]] = {}
    for kernel, table in data.get("kernels", {}).items():
        if kernel not in DEFAULTS:
            raise ValueError(f"{path}: unknown kernel {kernel!r}, expected one of {sorted(DEFAULTS)}")
        kernels[kernel] = {}
        for size, entry in table.items():
            if not size.isdigit():
                raise ValueError(f"{path}: {kernel}: size keys are integers, got {size!r}")
            _check_entry(entry, backend, f"{path}: {kernel}[{size}]")
            kernels[kernel][int(size)] = entry
    return devices, DeviceConfigs(path.stem, backend, arch, kernels)


@functools.cache
def device_configs(device_name: str) -> DeviceConfigs:
    """The configs of the first file in CONFIG_DIR (sorted by name) naming a substring of `device_name`."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        devices, configs = load_device_file(path)
        if any(pattern.lower() in device_name.lower() for pattern in devices):
            return configs
    return DeviceConfigs("defaults", None, None, {})


@functools.cache
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """CUs (ROCm) or SMs (CUDA); on the CPU (the interpreter runs programs one by one) a small fixed count."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def launch_config(
    kernel: str, size: int, device: torch.device, override: dict[str, Any] | None = None
) -> LaunchConfig:
    """The launch configuration of `kernel` at size `size` on `device`; `override` (tests, tuning) last."""
    if override is None:
        return _launch_config(kernel, size, device)  # every norm of every layer asks this: once per shape
    return _resolve(kernel, size, device, override)


@functools.lru_cache(maxsize=1024)
def _launch_config(kernel: str, size: int, device: torch.device) -> LaunchConfig:
    return _resolve(kernel, size, device, None)


def _resolve(kernel: str, size: int, device: torch.device, override: dict[str, Any] | None) -> LaunchConfig:
    configs = device_configs(device_name(device))
    default, from_file = _by_size(DEFAULTS[kernel], size), _by_size(configs.kernels.get(kernel, {}), size)
    merged = {**default, **from_file, **(override or {})}
    # A defaults-only run does not know its backend, so it passes only the options every backend has.
    options_allowed = BACKEND_OPTIONS.get(configs.backend, frozenset({"num_warps", "num_stages"}))
    return LaunchConfig(
        meta={k: v for k, v in merged.items() if k.isupper()},
        options={k: v for k, v in merged.items() if k in options_allowed},
        host={k: v for k, v in merged.items() if k in HOST_KEYS},
        source=configs.name,
    )
