"""Which path an op takes: its Triton kernel or its PyTorch reference, from `ZayaConfig.kernels` and the
device.

    if use_triton("rms_norm", mode, x.device): ...    # mode: "auto" | "triton" | "torch"

- `torch`: always the PyTorch reference; Triton is never imported.
- `auto` (the default): the Triton kernel on a GPU (CUDA or ROCm: torch calls both "cuda") when Triton
  imports, the reference everywhere else. It never picks the Triton interpreter, which runs kernels thousands
  of times slower than compiled code, even when TRITON_INTERPRET=1 is set.
- `triton`: the Triton kernel on a GPU, and on the CPU through the interpreter when TRITON_INTERPRET=1 (how
  the tests run the kernels against their references); where neither is possible, the reference, with a
  warning.

Each (op, mode, device, interpreter) decision is logged once on the `zaya_train` logger, at the op's first
call: "kernels: rms_norm takes the triton path (cuda device 'AMD Instinct MI300X', configs mi300x;
kernels=auto)". This module imports nothing of Triton until a decision needs it, so `torch` and CPU `auto`
runs work without it. The CPU GEMM route (`linear.py`, ZAYA_CPU_GEMM) is a separate choice that `kernels` does
not touch.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

MODES = ("auto", "triton", "torch")
log = logging.getLogger("zaya_train")
_logged: set[tuple] = set()


def check_mode(mode: str, name: str = "kernels") -> str:
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


@functools.cache
def triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except (ImportError, RuntimeError, OSError):  # absent, or broken (built for another ROCm/CUDA): none
        return False
    return True


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET as Triton itself reads it (Triton's knobs where it has them)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _decide(mode: str, device: torch.device, interpret: bool) -> tuple[bool, str, int]:
    """(use Triton, why, log level); cached, as ops call this on every forward."""
    if mode == "torch":
        return False, f"kernels={mode}", logging.INFO
    if device.type == "cuda":
        if triton_importable():
            from zaya_train.kernels.configs import device_configs, device_name

            name = device_name(device)
            why = f"cuda device {name!r}, configs {device_configs(name).name}; kernels={mode}"
            return True, why, logging.INFO
        level = logging.WARNING if mode == "triton" else logging.INFO
        return False, f"Triton does not import on this machine; kernels={mode}", level
    if mode == "auto":
        why = f"{device.type} tensors (auto never uses the Triton interpreter); kernels={mode}"
        return False, why, logging.INFO
    if device.type == "cpu" and interpret:
        why = f"cpu tensors through the Triton interpreter (TRITON_INTERPRET=1); kernels={mode}"
        return True, why, logging.INFO
    why = (
        f"{device.type} tensors and no Triton backend for them (on the CPU set TRITON_INTERPRET=1 for the "
        f"interpreter); kernels={mode}"
    )
    return False, why, logging.WARNING


def use_triton(op: str, mode: str, device: torch.device) -> bool:
    """Whether `op` runs its Triton kernel for tensors on `device` under `mode`; logs new decisions once. Inside
    torch.compile never: inductor generates its own kernels from the PyTorch reference."""
    if torch.compiler.is_compiling():
        return False
    check_mode(mode)
    # Only a `triton` decision on the CPU reads the interpreter setting (importing Triton to do so).
    interpret = mode == "triton" and device.type == "cpu" and triton_importable() and interpreter_enabled()
    use, reason, level = _decide(mode, device, interpret)
    key = (op, mode, device.type, interpret)
    if key not in _logged:
        _logged.add(key)
        log.log(level, "kernels: %s takes the %s path (%s)", op, "triton" if use else "torch", reason)
    return use
