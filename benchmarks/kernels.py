"""The Triton kernels against their PyTorch references, side by side on one GPU, forward + backward, at
ZAYA1-8B shapes (hidden 2048, router 256, vocabulary 262,272) in bf16:

- rms_norm:             `zaya_train.kernels.rms_norm.rms_norm`  vs the model's `rms_norm` (its autograd
  Function)
- residual_rms_norm:    the fused residual scaling + RMSNorm   vs `scale_residual` then `rms_norm`
- linear_cross_entropy: `zaya_train.kernels.lm_head`           vs `zaya_train.model.loss` (chunked, PyTorch
  ops)
- token_logprobs:       the same pair, temperature 0.7, a random upstream gradient per token
- moe_experts:          `zaya_train.kernels.moe.moe_experts`     vs the model's `ZayaExperts` (sort + grouped
  GEMMs), 16 experts of intermediate size 2048 (the zaya1_8b preset), a skip-class share of the tokens
- cca_conv_qk:          `zaya_train.kernels.cca.cca_conv_qk`     vs the model's CCA q/k path (composed conv,
  mean skips, QK norm with temp) at the zaya1_8b heads (8 query, 2 KV, head dim 128, 3 taps), rows of 4096
  packed with documents of ~512 tokens, as the trainer packs them

Each pair runs on the same tensors in the same process; the table gives both times, their ratio (reference /
kernel: above 1 the kernel is faster), peak memory and the largest difference between the two outputs. The
LM-head rows add the unfused path (logits, then F.cross_entropy) for scale. The last line is `ratio=<geometric
mean of the ratios>`.

    python benchmarks/kernels.py                        # bf16, 16384 tokens (norms), 8192 tokens (LM head)
    python benchmarks/kernels.py --lm-tokens 16384 --dtype fp32
    python benchmarks/kernels.py --tune                 # sweep launch configs, print device-file entries
    python benchmarks/kernels.py --smoke                # all code paths, tiny shapes, CPU + interpreter

On MI300X (ROCm torch, which ships its Triton as pytorch-triton-rocm):

    HIP_VISIBLE_DEVICES=0 python benchmarks/kernels.py
    HIP_VISIBLE_DEVICES=0 python benchmarks/kernels.py --tune > tune.txt

The first lines name the device, the torch / HIP or CUDA / Triton versions and the launch-config file the
kernels read (`zaya_train/kernels/configs/mi300x.json` on MI300X; "defaults" where no file names the device);
keep them with any figure. `--tune` times each kernel alone over a grid of block sizes, num_warps and, on
ROCm, waves_per_eu (on CUDA num_stages), plus the LM head's chunk_tokens on the whole loss, and prints the
fastest entry per kernel and size as JSON for the device file. Without a GPU the script exits saying so: the
kernels' CPU checks are `python -m pytest tests/kernels` (the Triton interpreter) and `python -m
zaya_train.kernels.compile_check`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable

HIDDEN, ROUTER_HIDDEN, VOCAB = 2048, 256, 262_272
MOE_FFN, EXPERTS = 2048, 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="rows for the norms")
    parser.add_argument("--lm-tokens", type=int, default=8192, help="tokens for the LM head")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--tune", action="store_true", help="sweep launch configs instead of comparing")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, Triton interpreter (checks the script, not speed)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=200, help="do_bench measuring time, ms")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    # Before anything imports Triton: the interpreter is chosen when Triton and the kernel modules are
    # imported.
    os.environ["TRITON_INTERPRET"] = "1"
    HIDDEN, ROUTER_HIDDEN, VOCAB = 48, 24, 300
    MOE_FFN, EXPERTS = 24, 4  # bf16 rows a multiple of 16 bytes, as the CPU's F.grouped_mm requires
    ARGS.tokens, ARGS.lm_tokens = 37, 40

import torch
import torch.nn.functional as F

if not ARGS.smoke and not torch.cuda.is_available():
    raise SystemExit(
        "benchmarks/kernels.py times Triton kernels on a GPU (ROCm or CUDA), and this machine has none "
        f"(torch {torch.__version__}). On a CPU, the kernels are checked against their references by "
        "`python -m pytest tests/kernels` (Triton interpreter) and compiled for MI300X and Hopper by "
        "`python -m zaya_train.kernels.compile_check`; `--smoke` runs this script's code at tiny shapes."
    )

import triton
from torch.func import functional_call

from zaya_train.kernels import cca as kernel_cca
from zaya_train.kernels import lm_head as kernel_lm_head
from zaya_train.kernels import moe as kernel_moe
from zaya_train.kernels import rms_norm as kernel_norm
from zaya_train.kernels.configs import BACKEND_OPTIONS, device_configs, device_name
from zaya_train.model import loss as reference_lm_head
from zaya_train.model import preset
from zaya_train.model.cca import ZayaCCAProjection, ZayaQKNorm
from zaya_train.model.layers import rms_norm as reference_rms_norm
from zaya_train.model.layers import scale_residual
from zaya_train.model.layout import build_layout
from zaya_train.model.moe import ZayaExperts

DEVICE = torch.device("cpu") if ARGS.smoke else torch.device("cuda", torch.cuda.current_device())
DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[ARGS.dtype]
EPS = 1e-5


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn (triton.testing.do_bench: L2 flushed between calls); one timed call on the
    CPU."""
    if ARGS.smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=ARGS.warmup, rep=ARGS.rep, return_mode="median")


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Memory fn allocates beyond what was allocated before it, at its peak (GPU only)."""
    if ARGS.smoke:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def randn(*shape: int, dtype: torch.dtype = DTYPE, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale + shift).to(dtype)


def fwd_bwd(op: Callable[..., object], leaves: list[torch.Tensor], upstream: list[torch.Tensor | None]):
    """A closure running op(*leaves) and its backward against `upstream` (one gradient per output), and
    returning the first output; gradients are dropped before each run so that none accumulate."""

    def run():
        for leaf in leaves:
            leaf.grad = None
        outputs = op(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, up) for out, up in zip(outputs, upstream) if up is not None]
        torch.autograd.backward([out for out, _ in pairs], [up for _, up in pairs])
        return outputs[-1].detach()

    return run


def leaves_of(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t.requires_grad_(True) for t in tensors if t is not None]


def cases() -> list[tuple[str, Callable, Callable, Callable | None]]:
    """(name, reference, kernel, unfused or None): closures that each run forward + backward."""
    n, d = ARGS.tokens, HIDDEN
    x, w = leaves_of(randn(n, d), randn(d, scale=0.1, shift=1.0))
    dy = randn(n, d)
    norm = (
        "rms_norm",
        fwd_bwd(lambda x, w: reference_rms_norm(x, w, EPS), [x, w], [dy]),
        fwd_bwd(lambda x, w: kernel_norm.rms_norm(x, w, EPS), [x, w], [dy]),
        None,
    )
    # As in a ZAYA1 block: the attention output and the parameters in the compute dtype, the residual in fp32,
    # the new residual used downstream (its gradient joins the norm's).
    h, r = randn(n, d), randn(n, d, dtype=torch.float32)
    params = [randn(d, scale=0.1), randn(d, scale=0.1, shift=1.0)] * 2  # h bias, h scale, r bias, r scale
    fused_leaves = leaves_of(h, r, *params, randn(d, scale=0.1, shift=1.0))
    dz = randn(n, d, dtype=torch.float32)

    def reference_fused(h, r, hb, hs, rb, rs, w):
        z = scale_residual(h, r, hb, hs, rb, rs)
        return z, reference_rms_norm(z, w, EPS)

    residual = (
        "residual_rms_norm",
        fwd_bwd(reference_fused, fused_leaves, [dz, dy]),
        fwd_bwd(lambda *t: kernel_norm.residual_rms_norm(*t, EPS), fused_leaves, [dz, dy]),
        None,
    )
    m, v = ARGS.lm_tokens, VOCAB
    lm_leaves = leaves_of(randn(m, d), randn(v, d, scale=0.02))  # hidden, weight
    labels = torch.randint(0, v, (m,), device=DEVICE)
    labels[::9] = -100
    one = torch.ones((), device=DEVICE)
    loss = (
        "linear_cross_entropy",
        fwd_bwd(lambda h, w: reference_lm_head.linear_cross_entropy(h, w, None, labels), lm_leaves, [one]),
        fwd_bwd(lambda h, w: kernel_lm_head.linear_cross_entropy(h, w, None, labels), lm_leaves, [one]),
        fwd_bwd(lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels), lm_leaves, [one]),
    )
    upstream = torch.randn(m, device=DEVICE)

    def unfused_logprobs(h, w):
        picked = (F.linear(h, w).float() / 0.7).log_softmax(-1).gather(1, labels.clamp_min(0)[:, None])
        return picked.squeeze(1) * (labels != -100)

    logprobs = (
        "token_logprobs",
        fwd_bwd(lambda h, w: reference_lm_head.token_logprobs(h, w, labels, 0.7), lm_leaves, [upstream]),
        fwd_bwd(lambda h, w: kernel_lm_head.token_logprobs(h, w, labels, 0.7), lm_leaves, [upstream]),
        fwd_bwd(unfused_logprobs, lm_leaves, [upstream]),
    )
    return [norm, residual, loss, logprobs, moe_case(), cca_case()]


def moe_case() -> tuple[str, Callable, Callable, None]:
    """The experts of one MoE layer on ARGS.tokens tokens: the model's torch path and the kernels share the
    parameters, the routing (uniform over the experts and the skip class) and the router's fp32 weights."""
    config = preset("zaya1_8b", hidden_size=HIDDEN, moe_intermediate_size=MOE_FFN, num_experts=EXPERTS,
                    kernels="torch")
    # Triton 3.9's interpreter multiplies bf16 tl.dot operands wrongly (it is right in fp32 and on GPUs), so the
    # smoke run checks this row in fp32.
    dtype = torch.float32 if ARGS.smoke else DTYPE
    experts = ZayaExperts(config).to(DEVICE, dtype)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(randn(*param.shape, dtype=dtype, scale=0.02))
    x, weight = leaves_of(randn(ARGS.tokens, HIDDEN, dtype=dtype), torch.rand(ARGS.tokens, device=DEVICE))
    ids = torch.randint(0, EXPERTS + 1, (ARGS.tokens,), device=DEVICE)
    leaves = [x, weight, experts.gate_up_proj, experts.down_proj]
    dy = randn(ARGS.tokens, HIDDEN, dtype=dtype)
    return (
        "moe_experts",
        fwd_bwd(lambda x, w, gate_up, down: experts(x, ids, w), leaves, [dy]),
        fwd_bwd(lambda x, w, gate_up, down: kernel_moe.moe_experts(x, ids, w, gate_up, down), leaves, [dy]),
        None,
    )


def cca_case() -> tuple[str, Callable, Callable, None]:
    """The q/k path of one CCA layer on ARGS.tokens tokens, from the q|k down-projection to the normed q and k:
    the model's torch path (`conv_with_skips`, then `ZayaQKNorm`) and the kernels share the inputs, the composed
    conv and temp."""
    config = preset("zaya1_8b", kernels="torch")
    dtype = torch.float32 if ARGS.smoke else DTYPE  # the interpreter's bf16 tl.dot is wrong (see moe_case)
    seq_len = min(4096, ARGS.tokens)
    batch = ARGS.tokens // seq_len
    proj, norm = ZayaCCAProjection(config, 0).to(DEVICE, dtype), ZayaQKNorm(config).to(DEVICE, dtype)
    document_ids = (torch.rand(batch, seq_len, device=DEVICE) < (1 / 8 if ARGS.smoke else 1 / 512)).cumsum(1)
    layout, _ = build_layout(config, batch, seq_len, DEVICE, None, None, document_ids, None, 0, None)
    with torch.no_grad():
        weight, bias = proj.composed_conv()
    x = randn(batch, seq_len, config.query_dim + config.kv_dim, dtype=dtype)
    leaves = leaves_of(x, weight, bias, norm.temp.detach().clone())
    upstream = [randn(batch, seq_len, heads, config.head_dim, dtype=torch.float32)
                for heads in (config.num_attention_heads, config.num_key_value_heads)]

    def reference(x, weight, bias, temp):
        q, k = proj.conv_with_skips(x, weight, bias, layout, None)
        return functional_call(norm, {"temp": temp}, (q, k))

    def kernel(x, weight, bias, temp):
        return kernel_cca.cca_conv_qk(x, weight, bias, temp, layout.shift_valid_TBS, config.num_attention_heads)

    return "cca_conv_qk", fwd_bwd(reference, leaves, upstream), fwd_bwd(kernel, leaves, upstream), None


def header() -> None:
    name = device_name(DEVICE)
    backend = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    print(f"device: {name}; torch {torch.__version__}, {backend}, triton {triton.__version__}")
    print(f"launch configs: {device_configs(name).name}; dtype {ARGS.dtype}; norms {ARGS.tokens} x {HIDDEN}; "
          f"LM head {ARGS.lm_tokens} tokens x {HIDDEN} -> {VOCAB}; MoE {ARGS.tokens} tokens, {EXPERTS} experts "
          f"{HIDDEN} -> {MOE_FFN}")


def compare() -> None:
    header()
    print(f"{'op':<22}{'reference ms':>14}{'kernel ms':>11}{'ratio':>8}{'ref MiB':>10}{'kernel MiB':>12}"
          f"{'max |diff|':>12}{'unfused ms':>12}{'unfused MiB':>13}")
    ratios = []
    for name, reference, kernel, unfused in cases():
        diff = (reference().float() - kernel().float()).abs().max().item()
        ref_ms, kernel_ms = bench_ms(reference), bench_ms(kernel)
        ref_mib, kernel_mib = peak_mib(reference), peak_mib(kernel)
        ratios.append(ref_ms / kernel_ms)
        extra = ""
        if unfused is not None:
            extra = f"{bench_ms(unfused):>12.2f}{fmt(peak_mib(unfused)):>13}"
        print(f"{name:<22}{ref_ms:>14.3f}{kernel_ms:>11.3f}{ratios[-1]:>8.2f}{fmt(ref_mib):>10}{fmt(kernel_mib):>12}"
              f"{diff:>12.2e}{extra}")
    print(f"ratio={math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


def fmt(mib: float | None) -> str:
    return "-" if mib is None else f"{mib:.0f}"


# --- tuning
# ------------------------------------------------------------------------------------------------------

def candidates(kernel: str, size: int) -> list[dict]:
    backend = device_configs(device_name(DEVICE)).backend or ("hip" if torch.version.hip else "cuda")
    knob = {"waves_per_eu": (0, 1, 2, 4)} if backend == "hip" else {"num_stages": (1, 2, 3)}
    if kernel == "rms_norm_fwd":
        grid = {"BLOCK_N": (1, 2, 4, 8, 16), "num_warps": (4, 8, 16)}
        if backend == "hip":
            grid |= knob
    elif kernel == "rms_norm_bwd":
        grid = {"BLOCK_N": (1, 2, 4, 8), "num_warps": (4, 8, 16, 32), "programs_per_sm": (1, 2, 4, 8)} | knob
    else:
        grid = {"BLOCK_V": (1024, 2048, 4096, 8192), "num_warps": (4, 8, 16)} | knob
    keys = list(grid)
    configs = [dict(zip(keys, values)) for values in itertools.product(*grid.values())]
    configs = [c for c in configs if c.get("BLOCK_N", 1) * triton.next_power_of_2(size) <= 16384]
    if ARGS.smoke:
        configs = configs[:2]
    allowed = BACKEND_OPTIONS[backend] | {"BLOCK_N", "BLOCK_V", "programs_per_sm"}
    return [{k: v for k, v in c.items() if k in allowed} for c in configs]


def tune() -> None:
    header()
    best: dict[str, dict[str, dict]] = {"rms_norm_fwd": {}, "rms_norm_bwd": {}}
    for size in (ROUTER_HIDDEN, HIDDEN):
        fwd, bwd = norm_runs(size)
        best["rms_norm_fwd"][str(size)] = sweep("rms_norm_fwd", size, fwd)
        best["rms_norm_bwd"][str(size)] = sweep("rms_norm_bwd", size, bwd)
    best["softmax_ce"] = {str(VOCAB): sweep("softmax_ce", VOCAB, softmax_run(min(ARGS.lm_tokens, 4096)))}
    hidden, weight = leaves_of(randn(ARGS.lm_tokens, HIDDEN), randn(VOCAB, HIDDEN, scale=0.02))
    labels = torch.randint(0, VOCAB, (ARGS.lm_tokens,), device=DEVICE)
    one = torch.ones((), device=DEVICE)
    timings = {}
    for chunk_tokens in ((8, 16) if ARGS.smoke else (1024, 2048, 4096, 8192)):
        run = fwd_bwd(lambda h, w, c=chunk_tokens: kernel_lm_head.linear_cross_entropy(h, w, None, labels, c),
                      [hidden, weight], [one])
        timings[chunk_tokens] = (bench_ms(run), peak_mib(run))
        print(f"lm_head chunk_tokens={chunk_tokens}: {timings[chunk_tokens][0]:.3f} ms, "
              f"{fmt(timings[chunk_tokens][1])} MiB", flush=True)
    fastest = min(timings, key=lambda c: timings[c][0])
    best["lm_head"] = {str(VOCAB): {"chunk_tokens": fastest}}
    print("fastest entries (paste into the device file's \"kernels\"):")
    print(json.dumps(best, indent=2))


def norm_runs(size: int) -> tuple[Callable[[dict], object], Callable[[dict], object]]:
    """The fused norm's forward and backward launchers (the heavier variants) at `size` features."""
    h, w, dy = randn(ARGS.tokens, size), randn(size, scale=0.1, shift=1.0), randn(ARGS.tokens, size)
    r, dz = randn(ARGS.tokens, size, dtype=torch.float32), randn(ARGS.tokens, size, dtype=torch.float32)
    scaling = (r, *[randn(size, scale=0.1), randn(size, scale=0.1, shift=1.0)] * 2)
    _, _, rstd = kernel_norm._forward(h, scaling, w, EPS)
    return (lambda c: kernel_norm._forward(h, scaling, w, EPS, c),
            lambda c: kernel_norm._backward(dy, dz, h, scaling, w, rstd, c))


def softmax_run(chunk: int) -> Callable[[dict], object]:
    """The softmax / cross-entropy kernel on one chunk of logits, with the gradient pass, per config. The
    gradient overwrites the logits (with small finite numbers): the timing does not depend on their values."""
    logits = randn(chunk, VOCAB)
    targets = torch.randint(0, VOCAB, (chunk,), device=DEVICE)
    lse, logprobs = torch.empty(chunk, device=DEVICE), torch.empty(chunk, device=DEVICE)
    coef = torch.full((chunk,), 1e-3, device=DEVICE)
    return lambda c: kernel_lm_head._chunk_softmax(logits, targets, 1.0, lse, logprobs, coef, c)


def sweep(kernel: str, size: int, run: Callable[[dict], object]) -> dict:
    results = []
    for config in candidates(kernel, size):
        try:
            run(config)
            results.append((bench_ms(lambda c=config: run(c)), config))
        except Exception as err:  # noqa: BLE001 (a config the compiler or the device rejects: skip it)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            print(f"{kernel}[{size}] {config}: skipped ({reason})")
    if not results:
        raise SystemExit(f"{kernel}[{size}]: every candidate config failed")
    results.sort(key=lambda item: item[0])
    for ms, config in results[:3]:
        print(f"{kernel}[{size}] {ms:.4f} ms {config}", flush=True)
    return results[0][1]


if __name__ == "__main__":
    if ARGS.smoke:
        print("smoke run: CPU, Triton interpreter, tiny shapes; the times mean nothing", file=sys.stderr)
    tune() if ARGS.tune else compare()
