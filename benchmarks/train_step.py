"""Forward+backward training step: our ZAYA1 vs transformers' ZayaForCausalLM, same weights and config, CPU fp32.

    python benchmarks/train_step.py                  # both regimes: nano 8x256 and small 4x512
    python benchmarks/train_step.py --regime nano --steps 20

Each (regime, implementation) runs in its own subprocess so peak memory is measured cleanly (peak RSS during
the timed steps minus RSS before them); the pair runs `--repeats` times alternately and each keeps its best
median, which damps drift in a shared machine's speed. Model FLOP/s counts 6 x (active non-embedding + LM head) parameters per
token plus causal attention (6 x layers x heads x head_dim x seq_len per token, fwd+bwd, the causal half of
12 x ...), as a fraction of the faster of two large fp32 GEMMs timed in the same run: PyTorch's BLAS (`a @ b`,
MKL) and oneDNN (on AMD CPUs MKL runs its AVX2 code, about half the AVX-512 rate). The run first prints the CPU
and the route our fp32 CPU GEMMs took (`zaya_train.kernels.linear.cpu_gemm_route`: by CPU vendor, or
ZAYA_CPU_GEMM), since figures compare only on the same CPU and route. The last line is
`ratio=<HF time / our time>` of the last regime run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REGIMES = {"nano": ("nano", 8, 256), "small": ("small", 4, 512)}


def median_seconds(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(regime: str, impl: str, steps: int, warmup: int) -> dict:
    import torch
    import transformers

    from zaya_train.hf import transformers_config
    from zaya_train.model import ZayaForCausalLM, preset

    torch.manual_seed(0)
    name, batch, seq_len = REGIMES[regime]
    config = preset(name)
    ours = ZayaForCausalLM(config)
    if impl == "hf":
        model = transformers.ZayaForCausalLM(transformers_config(config))
        model.load_state_dict(ours.state_dict())
        del ours
    else:
        model = ours
    model.train()
    ids = torch.randint(3, config.vocab_size, (batch, seq_len))

    # Ours trains through its fused LM-head loss (no logits tensor); HF's training step materialises logits.
    kwargs = {"return_logits": False} if impl == "ours" else {}

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, **kwargs).loss.backward()

    step()
    base = rss_bytes()
    seconds = median_seconds(step, steps, warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_bytes": max(peak - base, 0)}


def cpu_description() -> str:
    """The CPU as /proc/cpuinfo names it (a VM may mask the model name, so family and model numbers too), else
    as `platform` does."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    if "vendor_id" not in fields:  # e.g. aarch64 lists implementer and part numbers instead
        return f"{platform.machine()} ({', '.join(f'{k} {v}' for k, v in fields.items() if k.startswith('CPU '))})"
    avx512 = "AVX-512" if "avx512f" in fields.get("flags", "").split() else "no AVX-512"
    return (f"{fields.get('model name', '?')} ({fields['vendor_id']}, family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}, {avx512})")


def peak_gemm_flops(size: int = 2048, steps: int = 10) -> float:
    """Prints the CPU and our GEMM route, times a large fp32 GEMM through PyTorch's BLAS (`a @ b`) and through
    oneDNN (both, whichever route our kernels take), prints both and returns the faster FLOP/s: the reference for
    model FLOP/s."""
    import torch

    from zaya_train.kernels.linear import cpu_gemm_route

    override = os.environ.get("ZAYA_CPU_GEMM")
    print(f"CPU: {cpu_description()}; {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"zaya_train fp32 CPU GEMM route: {cpu_gemm_route()} "
          f"({f'ZAYA_CPU_GEMM={override}' if override else 'by CPU vendor'})")
    a, b = torch.randn(size, size), torch.randn(size, size)
    gemms = {"torch.mm": lambda: a @ b}
    if torch.backends.mkldnn.is_available():
        bt = b.t()
        gemms["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    rates = {name: 2 * size**3 / median_seconds(fn, steps, warmup=3) for name, fn in gemms.items()}
    for name, rate in rates.items():
        print(f"fp32 GEMM {size}^3 via {name}: {rate / 1e9:.1f} GFLOP/s")
    return max(rates.values())


def model_flops_per_step(regime: str) -> float:
    from zaya_train.model import parameter_counts, preset

    name, batch, seq_len = REGIMES[regime]
    config = preset(name)
    counts = parameter_counts(config)
    dense = counts["active"] + config.vocab_size * config.hidden_size  # the LM head matmul runs for every token
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return batch * seq_len * (6 * dense + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=[*REGIMES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", nargs=2, metavar=("REGIME", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
        return

    peak_gemm = peak_gemm_flops()
    regimes = list(REGIMES) if args.regime == "all" else [args.regime]
    ratio = None
    for regime in regimes:
        results: dict[str, dict] = {}
        for _ in range(args.repeats):
            for impl in ("ours", "hf"):
                cmd = [sys.executable, __file__, "--worker", regime, impl, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                run = json.loads(out.strip().splitlines()[-1])
                best = results.get(impl)
                results[impl] = run if best is None or run["seconds"] < best["seconds"] else best
        flops = model_flops_per_step(regime)
        name, batch, seq_len = REGIMES[regime]
        print(f"\n{regime}: preset {name}, {batch} x {seq_len} tokens, fwd+bwd, fp32")
        print(f"{'impl':<6}{'ms/step':>10}{'tokens/s':>12}{'peak MiB':>10}{'model GFLOP/s':>15}{'of GEMM':>9}")
        for impl, res in results.items():
            achieved = flops / res["seconds"]
            print(f"{impl:<6}{res['seconds'] * 1e3:>10.1f}{batch * seq_len / res['seconds']:>12.0f}"
                  f"{res['peak_bytes'] / 2**20:>10.0f}{achieved / 1e9:>15.1f}{achieved / peak_gemm:>9.1%}")
        ratio = results["hf"]["seconds"] / results["ours"]["seconds"]
        mem_ratio = results["hf"]["peak_bytes"] / max(results["ours"]["peak_bytes"], 1)
        print(f"{regime}: time ratio HF/ours = {ratio:.2f}x, peak memory ratio HF/ours = {mem_ratio:.2f}x")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
