"""Training throughput: FLOPs accounting for MFU (the metrics sink itself is zaya_train/metrics.py).

    from zaya_train.train.metrics import model_flops_per_token, peak_flops, throughput
    flops = model_flops_per_token(model_config, seq_len=4096)
    peak = peak_flops(device, override=cfg.trainer.peak_flops)   # None on a CPU: MFU is then not reported
    sink.log(step, loss, {"lr": lr, **throughput(tokens, seconds, flops, world_size, peak)})

Model FLOPs per token (forward + backward, the PaLM accounting, Chowdhery et al. 2022 App. B):

    6 * (active + V * D)  +  12 * sum_l (Q * d * ctx_l)

- `active` is `parameter_counts(config)["active"]`: every non-embedding parameter a token uses (attention,
  router, norms, scales, conv kernels, one expert per layer). `V * D` adds the LM head matmul, which costs
  FLOPs even when tied to the embedding; the embedding lookup costs none. Tokens sent to the skip class use no
  expert, so this slightly overstates a run that skips.
- Attention scores and the value mix cost 2 * Q * d * ctx FLOPs each per token and layer in the forward pass
  (Q query heads of dim d), three times that with the backward. `ctx_l` is the sequence length, or the window
  for `hybrid_sliding` layers. By default the full ctx is charged, as in PaLM, torchtitan and nanoGPT, so MFU
  is comparable with theirs; `causal=True` charges the (ctx + 1) / 2 keys a causal query really sees on
  average. Packed rows attend within documents only, so both overstate packed attention work.
"""

from __future__ import annotations

import torch

from zaya_train.model.config import ZayaConfig
from zaya_train.model.counts import parameter_counts

# Dense bf16 peak FLOP/s per device, matched by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS: dict[str, float] = {
    "MI300X": 1307.4e12,
    "H100 80GB HBM3": 989e12,  # the SXM part's device name
    "H100 SXM": 989e12,
    "H200": 989e12,  # same tensor cores as the H100 SXM
}


def model_flops_per_token(config: ZayaConfig, seq_len: int, causal: bool = False) -> float:
    """Training (forward + backward) FLOPs per token at row length `seq_len`; the formula is in the module doc."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    dense = 6 * (parameter_counts(config)["active"] + config.vocab_size * config.hidden_size)
    attention = 0.0
    for layer_type in config.layer_types:
        ctx = min(seq_len, config.sliding_window) if layer_type == "hybrid_sliding" else seq_len
        keys = (ctx + 1) / 2 if causal else ctx
        attention += 12 * config.query_dim * keys
    return float(dense + attention)


def peak_flops(device: torch.device | str | None = None, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` if given, else the PEAK_BF16_FLOPS entry for the device name;
    None on a CPU or an unknown accelerator (MFU is then not reported)."""
    if override is not None:
        return float(override)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def throughput(
    tokens: int, seconds: float, flops_per_token: float, num_devices: int, peak_flops_per_device: float | None
) -> dict[str, float]:
    """Throughput of `tokens` trained (all ranks together) in `seconds`: tokens/s, per-device tokens/s and
    model TFLOP/s, and `mfu` (the fraction of peak) when a peak is known."""
    if not seconds > 0 or num_devices <= 0:
        raise ValueError(
            f"throughput needs seconds > 0 and num_devices > 0, got {seconds!r} and {num_devices!r}"
        )
    tokens_per_s = tokens / seconds
    flops_per_device = tokens_per_s * flops_per_token / num_devices
    out = {
        "throughput/tokens_per_s": tokens_per_s,
        "throughput/tokens_per_s_per_device": tokens_per_s / num_devices,
        "throughput/tflops_per_device": flops_per_device / 1e12,
    }
    if peak_flops_per_device is not None:
        out["throughput/mfu"] = flops_per_device / peak_flops_per_device
    return out
