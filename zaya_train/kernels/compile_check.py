"""Compiles every launch configuration of every device file for that device's GPU architecture, offline (no
GPU needed: Triton's AMD and NVIDIA backends build gfx942 code objects and sm_90 cubins on any machine), and
reports the registers each kernel uses and whether it spills. A config that does not compile, or spills where
the file's size is at most MAX_SPILL_FREE_SIZE, is an error.

    python -m zaya_train.kernels.compile_check                  # every entry, its heaviest kernel variant
    python -m zaya_train.kernels.compile_check --all-variants   # every constexpr variant of every entry

The interpreter tests (tests/kernels) check what the kernels compute; this checks what the compiler makes of
the shipped configs: a typo'd block size, a kernel that stops lowering for one backend, or an entry that
spills. Run it without TRITON_INTERPRET (it needs the compiling `@triton.jit`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# A config may spill above this size (the CUDA RMSNorm backward at D >= 4096 spills in every config tried).
MAX_SPILL_FREE_SIZE = 2048

# Per kernel: its parameter types (bf16 compute, fp32 residual stream / statistics) and constexpr variants,
# the heaviest first.
_NORM_FWD = {
    "x_ptr": "*bf16", "stride_x": "i32", "r_ptr": "*fp32", "stride_r": "i32", "z_ptr": "*fp32",
    "stride_z": "i32", "hb_ptr": "*bf16", "hs_ptr": "*bf16", "rb_ptr": "*bf16", "rs_ptr": "*bf16",
    "w_ptr": "*bf16", "y_ptr": "*bf16", "stride_y": "i32", "rstd_ptr": "*fp32", "N": "i32", "D": "i32",
    "eps": "fp32",
}
_NORM_BWD = {
    "dy_ptr": "*bf16", "stride_dy": "i32", "dz_ptr": "*fp32", "stride_dz": "i32", "x_ptr": "*bf16",
    "stride_x": "i32", "r_ptr": "*fp32", "stride_r": "i32", "hb_ptr": "*bf16", "hs_ptr": "*bf16",
    "rb_ptr": "*bf16", "rs_ptr": "*bf16", "w_ptr": "*bf16", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
    "stride_dx": "i32", "dr_ptr": "*fp32", "stride_dr": "i32", "part_ptr": "*fp32", "N": "i32", "D": "i32",
    "rows_per_program": "i32",
}
_SOFTMAX_CE = {
    "logits_ptr": "*bf16", "stride_logits": "i64", "target_ptr": "*i64", "lse_ptr": "*fp32",
    "logprob_ptr": "*fp32", "coef_ptr": "*fp32", "V": "i32", "temperature": "fp32", "ignore_index": "i32",
}
# CCA q/k path: bf16 projection and parameters, uint8 shift masks, fp32 q, k and gradients of them.
_CCA_CONV = {
    "x_ptr": "*bf16", "stride_xb": "i32", "stride_xs": "i32", "w_ptr": "*bf16", "bias_ptr": "*bf16",
    "valid_ptr": "*u8",
}
_CCA_DIMS = {"S": "i32", "N": "i32", "H": "i32", "Q": "i32", "GROUP": "i32", "D": "i32"}
_CCA_NORM = {"scale": "fp32", "eps": "fp32"}
_CCA_FWD = _CCA_CONV | {"temp_ptr": "*bf16", "q_ptr": "*fp32", "k_ptr": "*fp32"} | _CCA_DIMS | _CCA_NORM
_CCA_BWD_NORM = _CCA_CONV | {
    "temp_ptr": "*bf16", "dq_ptr": "*fp32", "dk_ptr": "*fp32", "du_ptr": "*fp32", "part_ptr": "*fp32",
} | _CCA_DIMS | _CCA_NORM
_CCA_BWD_INPUT = {"du_ptr": "*fp32", "w_ptr": "*bf16", "valid_ptr": "*u8", "dx_ptr": "*bf16"} | _CCA_DIMS
_CCA_BWD_WEIGHT = {
    "du_ptr": "*fp32", "x_ptr": "*bf16", "stride_xb": "i32", "stride_xs": "i32", "valid_ptr": "*u8",
    "part_w_ptr": "*fp32", "part_b_ptr": "*fp32", "S": "i32", "N": "i32", "H": "i32", "D": "i32",
    "rows_per_program": "i32",
}
# MoE experts: bf16 activations and weights, the router's fp32 weight, int64 ids, int32 order and offsets.
_MOE_SLOTS = {"ids_ptr": "*i64", "first_ptr": "*i32", "order_ptr": "*i32", "N": "i32", "E": "i32"}
_MOE_GATE_UP = {
    "x_ptr": "*bf16", "stride_x": "i32", "order_ptr": "*i32", "offsets_ptr": "*i32", "w_ptr": "*bf16",
    "stride_we": "i32", "stride_wf": "i32", "act_ptr": "*bf16", "stride_act": "i32", "h_ptr": "*bf16",
    "stride_h": "i32", "D": "i32", "F": "i32", "E": "i32",
}
_MOE_DOWN = {
    "a_ptr": "*bf16", "stride_a": "i32", "order_ptr": "*i32", "offsets_ptr": "*i32", "w_ptr": "*bf16",
    "stride_we": "i32", "stride_wk": "i32", "stride_wd": "i32", "weight_ptr": "*fp32", "ids_ptr": "*i64",
    "out_ptr": "*bf16", "stride_out": "i32", "K": "i32", "D": "i32", "E": "i32",
}
_MOE_DOWN_BWD = {
    "dy_ptr": "*bf16", "stride_dy": "i32", "order_ptr": "*i32", "offsets_ptr": "*i32", "w_ptr": "*bf16",
    "stride_we": "i32", "stride_wd": "i32", "h_ptr": "*bf16", "stride_h": "i32", "weight_ptr": "*fp32",
    "ids_ptr": "*i64", "dh_ptr": "*bf16", "stride_dh": "i32", "dweight_ptr": "*fp32", "stride_dweight": "i32",
    "D": "i32", "F": "i32", "E": "i32",
}
_MOE_WGRAD = {
    "p_ptr": "*bf16", "stride_p": "i32", "q_ptr": "*bf16", "stride_q": "i32", "order_ptr": "*i32",
    "offsets_ptr": "*i32", "weight_ptr": "*fp32", "ids_ptr": "*i64", "dw_ptr": "*bf16", "stride_dwe": "i32",
    "stride_dwm": "i32", "M": "i32", "K": "i32", "E": "i32",
}
# BLOCK_E: ZAYA1's 16 experts.
VARIANTS = {
    "rms_norm_fwd": ("rms_norm", "_rms_norm_fwd_kernel", _NORM_FWD, [
        {"HAS_SCALING": True}, {"HAS_SCALING": False},
    ]),
    "rms_norm_bwd": ("rms_norm", "_rms_norm_bwd_kernel", _NORM_BWD, [
        {"HAS_SCALING": True, "HAS_DZ": True}, {"HAS_SCALING": True, "HAS_DZ": False},
        {"HAS_SCALING": False, "HAS_DZ": False},
    ]),
    "softmax_ce": ("lm_head", "_softmax_ce_kernel", _SOFTMAX_CE, [
        {"HAS_LSE": False, "HAS_GRAD": True}, {"HAS_LSE": True, "HAS_GRAD": True},
        {"HAS_LSE": False, "HAS_GRAD": False},
    ]),
    # TAPS: ZAYA1's cca_time0 + cca_time1 - 1.
    "cca_fwd": ("cca", "_cca_fwd_kernel", _CCA_FWD, [{"HAS_MASK": True, "TAPS": 3}, {"HAS_MASK": False, "TAPS": 3}]),
    "cca_bwd_norm": ("cca", "_cca_bwd_norm_kernel", _CCA_BWD_NORM, [
        {"HAS_MASK": True, "TAPS": 3}, {"HAS_MASK": False, "TAPS": 3},
    ]),
    "cca_bwd_input": ("cca", "_cca_bwd_input_kernel", _CCA_BWD_INPUT, [
        {"HAS_MASK": True, "TAPS": 3}, {"HAS_MASK": False, "TAPS": 3},
    ]),
    "cca_bwd_weight": ("cca", "_cca_bwd_weight_kernel", _CCA_BWD_WEIGHT, [
        {"HAS_MASK": True, "TAPS": 3}, {"HAS_MASK": False, "TAPS": 3},
    ]),
    "moe_permute": ("moe", "_token_slots_kernel", _MOE_SLOTS, [{"BLOCK_E": 16}]),
    "moe_gate_up": ("moe", "_gate_up_kernel", _MOE_GATE_UP, [
        {"SAVE_H": True, "BLOCK_E": 16}, {"SAVE_H": False, "BLOCK_E": 16},
    ]),
    "moe_down": ("moe", "_down_kernel", _MOE_DOWN, [
        {"HAS_WEIGHT": True, "BLOCK_E": 16}, {"HAS_WEIGHT": False, "BLOCK_E": 16},
    ]),
    "moe_down_bwd": ("moe", "_down_bwd_kernel", _MOE_DOWN_BWD, [{"BLOCK_E": 16}]),
    "moe_wgrad": ("moe", "_expert_wgrad_kernel", _MOE_WGRAD, [{"DOWN": True}, {"DOWN": False}]),
}


def _target(backend: str, arch: str):
    from triton.backends.compiler import GPUTarget

    if backend == "hip":
        return GPUTarget("hip", arch, 64)
    return GPUTarget("cuda", int(arch.removeprefix("sm_")), 32)


def _resources(compiled, backend: str) -> tuple[str, bool]:
    """(register summary, spills?) of a compiled kernel."""
    if backend == "hip":
        asm = compiled.asm["amdgcn"]
        vgprs = int(re.search(r"\.vgpr_count:\s+(\d+)", asm).group(1))
        spills = int(re.search(r"\.vgpr_spill_count:\s+(\d+)", asm).group(1))
        return f"vgpr={vgprs} spill={spills}", spills > 0
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        return "registers unknown (no cuobjdump)", False
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", handle.name], capture_output=True, text=True,
                               check=False).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.DOTALL)
    if found is None:
        return "registers unknown", False
    return f"reg={found.group(1)} stack={found.group(2)}", int(found.group(2)) > 0


def check(all_variants: bool = False, out=sys.stdout) -> list[str]:
    """Compiles the entries; prints one line per compile; returns the errors."""
    import importlib

    import triton
    from triton.compiler import ASTSource

    from zaya_train.kernels.configs import (
        BACKEND_OPTIONS,
        CONFIG_DIR,
        DEFAULTS,
        DeviceConfigs,
        _by_size,
        load_device_file,
    )

    # Triton registers its backends as "amd" and "nvidia"; targets name them "hip" and "cuda".
    available = {{"amd": "hip", "nvidia": "cuda"}.get(name, name) for name in triton.backends.backends}
    errors = []
    # The device files, then the built-in defaults (what a GPU without a file runs) on each backend's
    # reference.
    files = [(path.name, load_device_file(path)[1]) for path in sorted(CONFIG_DIR.glob("*.json"))]
    files += [(f"defaults@{arch}", DeviceConfigs("defaults", backend, arch, DEFAULTS))
              for backend, arch in (("hip", "gfx942"), ("cuda", "sm_90"))]
    for name, configs in files:
        if configs.backend not in available:
            print(f"{name}: skipped, this Triton has no {configs.backend} backend", file=out)
            continue
        target = _target(configs.backend, configs.arch)
        for kernel, (module_name, fn_name, signature, variants) in VARIANTS.items():
            fn = getattr(importlib.import_module(f"zaya_train.kernels.{module_name}"), fn_name)
            for size in sorted(configs.kernels.get(kernel, {})):
                entry = {**_by_size(DEFAULTS[kernel], size), **configs.kernels[kernel][size]}
                meta = {k: v for k, v in entry.items() if k.isupper()}
                if kernel.startswith(("rms_norm", "cca_")):  # a whole row / head per program
                    meta["BLOCK_D"] = triton.next_power_of_2(size)
                options = {k: v for k, v in entry.items() if k in BACKEND_OPTIONS[configs.backend]}
                for variant in variants if all_variants else variants[:1]:
                    where = f"{name} {kernel}[{size}] {variant} {meta} {options}"
                    try:
                        compiled = triton.compile(
                            ASTSource(fn, signature | dict.fromkeys({**variant, **meta}, "constexpr"),
                                      constexprs={**variant, **meta}),
                            target=target, options=options,
                        )
                    except Exception as err:  # noqa: BLE001 (any compiler failure is this check's finding)
                        errors.append(f"{where}: does not compile: {str(err).splitlines()[0][:300]}")
                        print(errors[-1], file=out)
                        continue
                    summary, spills = _resources(compiled, configs.backend)
                    print(f"{where}: {summary}", file=out, flush=True)
                    if spills and size <= MAX_SPILL_FREE_SIZE:
                        errors.append(f"{where}: spills ({summary})")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-variants", action="store_true", help="every constexpr variant, not one")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
    errors = check(args.all_variants)
    if errors:
        raise SystemExit("compile_check: " + "\n".join(errors))
    print("compile_check: every entry compiles without spilling (where it must not)")


if __name__ == "__main__":
    main()
