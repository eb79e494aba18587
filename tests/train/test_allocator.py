"""zaya_train.train.allocator, read back through glibc's own accounting (`mallinfo2`): with freed memory kept, a
16 MiB tensor comes from the heap and its memory stays there after it is freed (the next step reuses it without
page faults); glibc's defaults map it fresh and unmap it on free; `ZAYA_MALLOC=default` leaves glibc alone; a bad
value is refused naming the variable."""

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

from zaya_train.train import allocator

ONE_TENSOR = """
import ctypes, ctypes.util, torch
from zaya_train.train.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
mallinfo2.restype = MallInfo2
taken = keep_freed_memory()
before = mallinfo2()
tensor = torch.ones(16 << 18)
held = mallinfo2()
del tensor
freed = mallinfo2()
print(taken, held.hblkhd - before.hblkhd, freed.fordblks - before.fordblks)
"""
MIB = 1 << 20


def one_tensor(malloc: str) -> tuple[bool, int, int]:
    """(settings taken, bytes mmapped for the 16 MiB tensor, free bytes the heap kept after freeing it)."""
    # Another allocator (LD_PRELOAD) or glibc tunables in the environment would decide these numbers instead.
    env = {key: value for key, value in os.environ.items()
           if key not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not key.startswith("MALLOC_")}
    env["ZAYA_MALLOC"] = malloc
    out = subprocess.run([sys.executable, "-c", ONE_TENSOR], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    taken, mapped, kept = out.stdout.split()
    return taken == "True", int(mapped), int(kept)


def has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return bool(name) and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not has_mallinfo2(), reason="glibc >= 2.33 (mallinfo2)")
def test_freed_tensors_stay_in_the_heap_for_the_next_step():
    taken, mapped, kept = one_tensor("keep")
    assert taken and mapped == 0 and kept >= 16 * MIB
    taken, mapped, kept = one_tensor("default")
    assert not taken and mapped >= 16 * MIB and kept < 16 * MIB


def test_a_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("ZAYA_MALLOC", "jemalloc")
    allocator.keep_freed_memory.cache_clear()
    with pytest.raises(ValueError, match="ZAYA_MALLOC"):
        allocator.keep_freed_memory()
    allocator.keep_freed_memory.cache_clear()
