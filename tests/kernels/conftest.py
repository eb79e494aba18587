"""`interpret`: the Triton kernel modules, run by the Triton interpreter on the CPU.

Triton decides when it is first imported (for its own library functions: tl.sum, tl.max, ...) and when a
kernel module is imported (for its `@triton.jit` functions) whether they compile or interpret, and it cannot
be imported twice in one process. So TRITON_INTERPRET=1 is set here, when pytest collects this directory,
before anything in the session imports Triton; it stays set for the session, which changes nothing for code
that does not ask for Triton on the CPU (`kernels="auto"` never uses the interpreter). The fixture fails,
saying so, if Triton was imported compiled before this file ran."""

import importlib
import os
from types import SimpleNamespace

import pytest

os.environ["TRITON_INTERPRET"] = "1"

KERNEL_MODULES = ("rms_norm", "lm_head", "moe", "cca")


def _is_interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


@pytest.fixture(scope="session")
def interpret():
    pytest.importorskip("triton")
    import triton.language as tl

    if not _is_interpreted(tl.standard.sum):
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (tests/kernels/conftest.py); run "
                    "`TRITON_INTERPRET=1 python -m pytest tests/kernels`")
    modules = {name: importlib.import_module(f"zaya_train.kernels.{name}") for name in KERNEL_MODULES}
    for name, module in modules.items():
        kinds = ("JITFunction", "InterpretedFunction")
        kernels = [v for v in vars(module).values() if type(v).__name__ in kinds]
        assert kernels and all(map(_is_interpreted, kernels)), f"zaya_train.kernels.{name}: compiled"
    return SimpleNamespace(**modules)
