"""`recipe=plan`: what a ZAYA1 model costs on a cluster, worked out on paper before any GPU is booked.

    zaya-train recipe=plan model.preset=zaya1_8b plan.cluster=mi300x plan.nodes=128 plan.seq_len=4096

    from zaya_train.model import preset
    from zaya_train.plan import PlanConfig, format_table, run_plan
    plan = run_plan(preset("zaya1_8b"), PlanConfig(cluster="mi300x", nodes=1), run_dir="runs/plan")  # + plan.json

Everything is computed from the config, analytically (no model is built): parameters, training FLOPs per token,
memory per GPU under ZeRO 0-3 with and without activation checkpointing, the largest micro-batch that fits,
tokens/s and days per trillion tokens at a stated MFU, and warnings for the MI300X sizing rules. Each quantity is a
small pure function below; `build_plan` puts them together, `format_table` prints them, `run_plan` also writes
`run_dir/plan.json`.

Accounting conventions (each function's docstring has its formula):

- Parameters: counted from the shapes the modules create (`layer_parameters`); tests check the count against
  `numel` of instantiated models. `active` excludes the embedding and counts one expert per layer (top-1), the
  papers' "760M active / 8.3B total" convention; `total` includes the (tied) embedding once.
- FLOPs per token: the trainer's MFU accounting (`zaya_train.train.metrics.model_flops_per_token`), i.e.
  6 * (active + V * D) + 12 * Q * ctx per layer (the LM head's matmul costs FLOPs even when tied; the full
  context is charged, as PaLM/torchtitan/nanoGPT do).
- Memory, mixed precision (`precision="bf16"`): bf16 weights (2 B/param) and gradients (2 B/param); the optimizer
  holds an fp32 master copy plus its moments: AdamW 4 + 4 + 4 = 12 B/param; Muon one fp32 momentum buffer for the
  matrices it orthogonalises (2-D linear weights and the experts: 4 + 4 = 8 B/param) and AdamW's 12 B/param for
  the rest (embedding / LM head, conv kernels, norms, biases, scales), the split `zaya_train.train.optim` makes.
  `precision="fp32"`: 4 + 4 B/param and no master copy (AdamW 8, Muon matrices 4).
  ZeRO over all `nodes * gpus_per_node` ranks (data parallelism only, as ZAYA1 trained): stage 1 partitions the
  optimizer state, stage 2 also the gradients, stage 3 also the weights; a partition is ceil(params / ranks).
- Not counted (covered by `memory_headroom`, 10% of the device by default): the HIP/CUDA context, RCCL/NCCL
  buffers, ZeRO reduce / all-gather buckets (ZeRO-3 gathers about a layer of bf16 weights at a time), allocator
  fragmentation, and DeepSpeed's optional full-size fp32 gradient accumulator (`data_types.grad_accum_dtype=fp32`
  at ZeRO-1, 4 B/param unpartitioned; this project leaves it off).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zaya_train.model.config import ZayaConfig
from zaya_train.train.metrics import PEAK_BF16_FLOPS

GIB = 2**30
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("bf16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)
# Sizing rules (see `sizing_warnings`).
HEAD_DIM_MULTIPLE = 64
GEMM_MULTIPLE = 256
VOCAB_MULTIPLE = 64  # the LM head's rows; zaya_train.train.config.padded_vocab_size pads to this multiple
MIN_TOKENS_PER_EXPERT = 256
LOSS_CHUNK_TOKENS = 256  # zaya_train.model.loss.DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class ClusterSpec:
    """One accelerator kind: memory as the runtime reports it (GiB of HBM) and the dense bf16 peak."""

    name: str
    device: str
    memory_bytes: int
    peak_bf16_flops: float
    gpus_per_node: int = 8


CLUSTERS: dict[str, ClusterSpec] = {
    "mi300x": ClusterSpec("mi300x", "AMD Instinct MI300X", 192 * GIB, PEAK_BF16_FLOPS["MI300X"]),
    "h100": ClusterSpec("h100", "NVIDIA H100 SXM", 80 * GIB, PEAK_BF16_FLOPS["H100 SXM"]),
    "h200": ClusterSpec("h200", "NVIDIA H200", 141 * GIB, PEAK_BF16_FLOPS["H200"]),
}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PlanConfig:
    """`recipe=plan` settings (the `plan` section). None means: from the cluster preset (`gpus_per_node`,
    `gpu_memory_gib`), the largest that fits (`micro_batch_size`), no gradient accumulation
    (`global_batch_tokens`). `optimizer`, `zero_stage` and `activation_checkpointing` choose the headline row;
    the table and plan.json show every ZeRO stage, both optimizers and both checkpointing settings anyway."""

    cluster: str = "mi300x"
    nodes: int = 1
    gpus_per_node: int | None = None
    gpu_memory_gib: float | None = None
    mfu: float = 0.35
    seq_len: int = 4096
    micro_batch_size: int | None = None
    global_batch_tokens: int | None = None
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    zero_stage: int = 1
    precision: str = "bf16"
    # Fraction of each device kept free for what the estimate leaves out (module doc).
    memory_headroom: float = 0.1
    # Ranks one layer's experts are spread over; the trainer runs no expert parallelism (1), the experts-per-rank
    # rule reads it.
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        def require(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ValueError(f"plan.{key}: {message}")

        require(self.cluster in CLUSTERS, "cluster", f"unknown cluster {self.cluster!r}, expected one of {sorted(CLUSTERS)}")
        require(_positive_int(self.nodes), "nodes", f"must be a positive integer, got {self.nodes!r}")
        require(self.gpus_per_node is None or _positive_int(self.gpus_per_node), "gpus_per_node",
                f"must be a positive integer or null, got {self.gpus_per_node!r}")
        require(self.gpu_memory_gib is None or self.gpu_memory_gib > 0, "gpu_memory_gib",
                f"must be > 0 or null, got {self.gpu_memory_gib!r}")
        require(0 < self.mfu <= 1, "mfu", f"must be in (0, 1], got {self.mfu!r}")
        require(_positive_int(self.seq_len), "seq_len", f"must be a positive integer, got {self.seq_len!r}")
        require(self.micro_batch_size is None or _positive_int(self.micro_batch_size), "micro_batch_size",
                f"must be a positive integer or null (largest that fits), got {self.micro_batch_size!r}")
        require(self.global_batch_tokens is None or _positive_int(self.global_batch_tokens), "global_batch_tokens",
                f"must be a positive integer or null, got {self.global_batch_tokens!r}")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.zero_stage in ZERO_STAGES, "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        require(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        require(0 <= self.memory_headroom < 1, "memory_headroom", f"must be in [0, 1), got {self.memory_headroom!r}")
        require(_positive_int(self.expert_parallel), "expert_parallel",
                f"must be a positive integer, got {self.expert_parallel!r}")

    @property
    def spec(self) -> ClusterSpec:
        return CLUSTERS[self.cluster]

    @property
    def resolved_gpus_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node is not None else self.spec.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.resolved_gpus_per_node

    @property
    def device_memory_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB) if self.gpu_memory_gib is not None else self.spec.memory_bytes


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def attention_parameters(config: ZayaConfig) -> dict[str, int]:
    """One CCA layer, by tensor group. D hidden, Q = h_q * d query latent, K = h_k * d KV latent, C = Q + K conv
    channels, T0/T1 conv taps:
    projections D(Q + 2K) (q, k, two half-width value projections) + o_proj Q D (+ Q + 2K and D with attention
    bias); depthwise conv C T0 + C; head-grouped conv C d T1 + C (each group is one head's d channels); key
    temperature h_k."""
    d_model, q_dim, kv_dim, d = config.hidden_size, config.query_dim, config.kv_dim, config.head_dim
    channels = q_dim + kv_dim
    bias = config.attention_bias
    return {
        "projection_matrices": d_model * (q_dim + 2 * kv_dim) + q_dim * d_model,
        "projection_biases": (q_dim + 2 * kv_dim + d_model) if bias else 0,
        "conv": channels * config.cca_time0 + channels + channels * d * config.cca_time1 + channels,
        "temp": config.num_key_value_heads,
    }


def router_parameters(config: ZayaConfig, layer_idx: int) -> dict[str, int]:
    """One router: down_proj D R + R; EDA scale R (every layer but the first); RMSNorm R; fc1, fc2 R^2 + R each;
    out_proj R (E + 1) (the skip class, no bias). The balancing biases are a buffer, not parameters."""
    d_model, r = config.hidden_size, config.router_hidden_size
    return {
        "matrices": d_model * r + 2 * r * r + r * config.num_router_classes,
        "vectors": r + (r if layer_idx > 0 else 0) + r + 2 * r,
    }


def layer_parameters(config: ZayaConfig, layer_idx: int) -> dict[str, int]:
    """One decoder layer: CCA, router, E SwiGLU experts (3 E F D: gate|up 2F x D, down D x F), two RMSNorms (2D)
    and two learned residual scalings (4D each)."""
    attn = attention_parameters(config)
    router = router_parameters(config, layer_idx)
    return {
        "attention": sum(attn.values()),
        "attention_matrices": attn["projection_matrices"],
        "router": router["matrices"] + router["vectors"],
        "router_matrices": router["matrices"],
        "experts": 3 * config.num_experts * config.moe_intermediate_size * config.hidden_size,
        "norms_and_scales": 2 * config.hidden_size + 8 * config.hidden_size,
    }


def parameter_counts(config: ZayaConfig) -> dict[str, int]:
    """Analytic counts, with the keys (and meaning) of `zaya_train.model.parameter_counts`, plus `muon`: the
    parameters Muon updates (2-D linear weights and experts; all else stays on AdamW).

    total = embedding + sum over layers + 3D (input scale and bias, final norm); embedding = V D, plus V D (and V
    with a bias) for an untied LM head; active = total - embedding - (E - 1) * one expert per layer."""
    d_model, vocab = config.hidden_size, config.vocab_size
    layers = [layer_parameters(config, i) for i in range(config.num_hidden_layers)]
    embedding = vocab * d_model
    lm_head_bias = vocab if config.lm_head_bias else 0
    if not config.tie_word_embeddings:
        embedding += vocab * d_model
    body = sum(layer["attention"] + layer["router"] + layer["experts"] + layer["norms_and_scales"] for layer in layers)
    total_non_embedding = body + 3 * d_model + lm_head_bias
    one_expert = 3 * config.moe_intermediate_size * d_model
    active = total_non_embedding - config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok) * one_expert
    muon = sum(layer["attention_matrices"] + layer["router_matrices"] + layer["experts"] for layer in layers)
    return {
        "total": total_non_embedding + embedding,
        "embedding": embedding,
        "total_non_embedding": total_non_embedding,
        "active": active,
        "active_with_embedding": active + embedding,
        "expert": one_expert,
        "muon": muon,
    }


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and throughput


def flops_per_token(config: ZayaConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward): `dense` = 6 * active (one expert per layer, no embedding),
    `lm_head` = 6 V D, `attention` = sum over layers of 12 Q ctx (scores and value mix, 2 Q ctx each forward, x3
    with the backward; ctx = seq_len, or the window of `hybrid_sliding` layers). `total` equals the trainer's
    `model_flops_per_token(config, seq_len)`, so a planned MFU and a logged one are the same quantity."""
    active = parameter_counts(config)["active"]
    attention = 0.0
    for layer_type in config.layer_types:
        ctx = min(seq_len, config.sliding_window) if layer_type == "hybrid_sliding" else seq_len
        attention += 12.0 * config.query_dim * ctx
    dense = 6.0 * active
    lm_head = 6.0 * config.vocab_size * config.hidden_size
    return {"dense": dense, "lm_head": lm_head, "attention": attention, "total": dense + lm_head + attention}


def throughput(flops_per_token_total: float, world_size: int, peak_flops: float, mfu: float) -> dict[str, float]:
    """tokens/s = mfu * peak * GPUs / FLOPs per token; days per trillion tokens = 1e12 / (tokens/s) / 86400."""
    tokens_per_s = mfu * peak_flops * world_size / flops_per_token_total
    return {
        "mfu": mfu,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world_size,
        "days_per_trillion_tokens": 1e12 / tokens_per_s / 86400,
    }


# ---------------------------------------------------------------------------------------------------------------
# Memory


def _act_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def layer_activation_bytes_per_token(config: ZayaConfig, precision: str = "bf16") -> int:
    """Bytes one decoder layer keeps for the backward pass, per token, without checkpointing.

    These are the tensors autograd saves in this code base's layer (a = 2 bytes in bf16, 4 in fp32; fp32 items
    are fp32 whatever the compute dtype; D hidden, Q, K query/KV latents, h_q, h_k heads, F expert width, R router
    latent, E experts):

        CCA  a (2D + 3Q + 3K)           normed input, conv input [q|k], SDPA q, k, v, output, o_proj output
             + 4 (D + 1 + Q + 2K + 4 h_q + 3 h_k)   fp32 residual + 1/rms, QK-norm inputs and scales, normed
                                        keys (for temp), attention log-sum-exp
        MoE  a (5D + 4F + 6R + 1)        normed input, gathered tokens, gate|up (2F), SiLU(gate), SwiGLU product,
                                        expert output before / after weighting, residual-scale input, 6 router
                                        MLP tensors, the routing weight
             + 4 (D + E + 3)             fp32 residual + 1/rms, router-norm 1/rms, router softmax (E + 1)
             + 17                        int64 routing indices (sort order, selected class), bool skip mask

    In bf16 that is 8D + 10Q + 14K + 16 h_q + 12 h_k + 4 (CCA) + 14D + 8F + 12R + 4E + 31 (MoE). Assumptions:
    a fused (flash / memory-efficient) attention that keeps no S x S scores (true of flash-attn and SDPA's fused
    kernels, what GPUs run); top-1 routing, so expert activations do not grow with E; `tests/test_plan.py`
    checks the count against the bytes autograd saves in an instantiated bf16 model.
    ZAYA1-8B in bf16: 30,364 + 48,223 = 78,587 bytes (76.7 KiB) per token and layer."""
    a = _act_bytes(precision)
    d_model, q_dim, kv_dim = config.hidden_size, config.query_dim, config.kv_dim
    h_q, h_k = config.num_attention_heads, config.num_key_value_heads
    f, r, e = config.moe_intermediate_size, config.router_hidden_size, config.num_experts
    cca = a * (2 * d_model + 3 * q_dim + 3 * kv_dim) + 4 * (d_model + 1 + q_dim + 2 * kv_dim + 4 * h_q + 3 * h_k)
    moe = a * (5 * d_model + 4 * f + 6 * r + 1) + 4 * (d_model + e + 3) + 17
    return cca + moe


def checkpointed_layer_bytes_per_token(config: ZayaConfig, precision: str = "bf16") -> int:
    """With activation checkpointing (one checkpoint per decoder layer, as `gradient_checkpointing` does) a layer
    keeps only its inputs: the fp32 residual stream (4D) and the router's EDA state (a R)."""
    return 4 * config.hidden_size + _act_bytes(precision) * config.router_hidden_size


def layer_activation_constant_bytes(config: ZayaConfig, precision: str = "bf16") -> int:
    """Token-independent tensors a layer saves: the fused q|k|v projection weight D (Q + 2K) and the composed
    conv kernel C d (T0 + T1 - 1) plus one head-block product (h_q + h_k) d^2, in the compute dtype."""
    c = config.query_dim + config.kv_dim
    taps = config.cca_time0 + config.cca_time1 - 1
    elements = (
        config.hidden_size * (config.query_dim + 2 * config.kv_dim)
        + c * config.head_dim * taps
        + (config.num_attention_heads + config.num_key_value_heads) * config.head_dim**2
    )
    return _act_bytes(precision) * elements


def model_activation_bytes_per_token(config: ZayaConfig, precision: str = "bf16") -> int:
    """Outside the layers, per token: input ids (8), the scaled embedding (a D), the final norm's fp32 input and
    1/rms (4D + 4), the hidden-state gradient the fused loss forms in its forward (a D), RoPE cos and sin (fp32,
    2 x 4 x rotary dim per layer type)."""
    a = _act_bytes(precision)
    rope = sum(8 * config.rotary_dim(t) for t in set(config.layer_types))
    return 8 + 2 * a * config.hidden_size + 4 * config.hidden_size + 4 + rope


def loss_constant_bytes(config: ZayaConfig) -> int:
    """The fused chunked LM head + cross-entropy: the fp32 gradient of the V x D head weight it accumulates in the
    forward walk (4 V D), plus one chunk's fp32 logits and their softmax gradient (2 x 4 x 256 x V)."""
    return 4 * config.vocab_size * config.hidden_size + 2 * 4 * LOSS_CHUNK_TOKENS * config.vocab_size


def activation_bytes(
    config: ZayaConfig, seq_len: int, micro_batch_size: int, checkpointing: bool, precision: str = "bf16"
) -> int:
    """Peak activation memory of one micro-batch (micro_batch_size * seq_len tokens) on one GPU:

        saved      = tokens * (L * per_layer + outside)  + L * layer_constant + loss_constant
        workspace  = tokens * per_layer + layer_constant    (without checkpointing: one layer's gradient
                     temporaries while its backward runs, taken as big as what it saved)
                   = 2 * (tokens * per_layer + layer_constant)   (with checkpointing: the recomputed layer and its
                     gradient temporaries)

    where per_layer is `layer_activation_bytes_per_token` and, with checkpointing, L * per_layer becomes
    L * `checkpointed_layer_bytes_per_token`. Linear in micro_batch_size, which `largest_micro_batch` uses."""
    tokens = seq_len * micro_batch_size
    layers = config.num_hidden_layers
    full = layer_activation_bytes_per_token(config, precision)
    const = layer_activation_constant_bytes(config, precision)
    kept = checkpointed_layer_bytes_per_token(config, precision) if checkpointing else full
    saved = tokens * (layers * kept + model_activation_bytes_per_token(config, precision)) + layers * const
    workspace = (2 if checkpointing else 1) * (tokens * full + const)
    return saved + workspace + loss_constant_bytes(config)


def optimizer_bytes_per_param(optimizer: str, precision: str) -> tuple[int, int]:
    """(bytes per Muon-updated parameter, bytes per AdamW-updated parameter) of optimizer state, master copy
    included. AdamW: fp32 master + two fp32 moments (12; 8 in fp32 training, no master). Muon: fp32 master + one
    fp32 momentum for its matrices (8; 4 in fp32), AdamW's for the rest."""
    master = 4 if precision == "bf16" else 0
    adamw = master + 8
    return (master + 4 if optimizer == "muon" else adamw), adamw


def _partition(count: int, ranks: int) -> int:
    return -(-count // ranks)


def state_bytes(counts: dict[str, int], zero_stage: int, world_size: int, optimizer: str, precision: str) -> dict[str, int]:
    """Weights, gradients and optimizer state per GPU. Weights P * w (w = 2 in bf16, 4 in fp32), divided over the
    ranks at ZeRO-3; gradients P * w, divided from ZeRO-2; optimizer state (`optimizer_bytes_per_param`) divided
    from ZeRO-1. A divided tensor takes ceil(P / ranks) elements per rank (ZeRO pads its partitions)."""
    w = 2 if precision == "bf16" else 4
    total = counts["total"]
    muon_params = counts["muon"] if optimizer == "muon" else 0
    per_muon, per_adamw = optimizer_bytes_per_param(optimizer, precision)

    def share(params: int, divided: bool) -> int:
        return _partition(params, world_size) if divided else params

    return {
        "weights": w * share(total, zero_stage >= 3),
        "gradients": w * share(total, zero_stage >= 2),
        "optimizer": per_muon * share(muon_params, zero_stage >= 1) + per_adamw * share(total - muon_params, zero_stage >= 1),
    }


def memory_per_gpu(
    config: ZayaConfig, counts: dict[str, int], zero_stage: int, world_size: int, optimizer: str, precision: str,
    seq_len: int, micro_batch_size: int, checkpointing: bool,
) -> dict[str, int]:
    """{weights, gradients, optimizer, activations, total} in bytes for one GPU."""
    out = state_bytes(counts, zero_stage, world_size, optimizer, precision)
    out["activations"] = activation_bytes(config, seq_len, micro_batch_size, checkpointing, precision)
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out


def usable_bytes(device_memory_bytes: int, headroom: float) -> int:
    return int(device_memory_bytes * (1 - headroom))


def largest_micro_batch(static_bytes: int, act_at_zero: int, act_per_sequence: int, budget_bytes: int) -> int:
    """The largest n with static + act_at_zero + n * act_per_sequence <= budget (0 when not even one sequence
    fits). Activations are affine in the micro-batch size (`activation_bytes`), hence the closed form."""
    free = budget_bytes - static_bytes - act_at_zero
    return max(0, free // act_per_sequence)


def max_micro_batch(
    config: ZayaConfig, counts: dict[str, int], zero_stage: int, world_size: int, optimizer: str, precision: str,
    seq_len: int, checkpointing: bool, budget_bytes: int,
) -> int:
    static = sum(state_bytes(counts, zero_stage, world_size, optimizer, precision).values())
    at_zero = activation_bytes(config, seq_len, 0, checkpointing, precision)
    per_seq = activation_bytes(config, seq_len, 1, checkpointing, precision) - at_zero
    return largest_micro_batch(static, at_zero, per_seq, budget_bytes)


def choose_micro_batch(fitting: int, seq_len: int, world_size: int, global_batch_tokens: int | None) -> int:
    """The headline micro-batch when none is given: the largest that fits (`fitting`) or, with a global batch, the
    largest that fits and divides each rank's share of it (global / (seq_len * GPUs) sequences), so that the step
    is a whole number of accumulation steps. Never below 1 (the plan then warns that it does not fit)."""
    if global_batch_tokens is None:
        return max(fitting, 1)
    per_rank = global_batch_tokens // (seq_len * world_size)
    divisors = [n for n in range(1, min(fitting, per_rank) + 1) if per_rank % n == 0]
    return divisors[-1] if divisors else 1


# ---------------------------------------------------------------------------------------------------------------
# Sizing rules


def sizing_warnings(config: ZayaConfig, micro_batch_size: int, seq_len: int, expert_parallel: int = 1) -> list[str]:
    """MI300X sizing rules (ZAYA1-base report, arXiv 2511.17127; its exact tables were not recovered, so these are
    the stated rules plus our reading of them):

    - head_dim a multiple of 64 (128 preferred): attention kernels tile the head dimension by 64;
    - GEMM dimensions multiples of 256 (hidden, query latent, the fused q|k|v projection width, expert width):
      hipBLASLt's macro tiles are 256 wide and a ragged edge wastes a tile's worth of matrix-core work; the
      vocabulary (LM head rows) is held to 64, the multiple this project pads tokenizers to;
    - experts per rank: num_experts divisible by `expert_parallel`, and each expert's grouped GEMM fed at least
      256 tokens per micro-batch on average (top-1: micro_batch * seq_len * expert_parallel / num_experts), below
      which the expert GEMMs cannot fill the GPU.
    """
    warnings: list[str] = []
    if config.head_dim % HEAD_DIM_MULTIPLE:
        warnings.append(
            f"head_dim={config.head_dim} is not a multiple of {HEAD_DIM_MULTIPLE} (MI300X rule; 128 is preferred)"
        )
    gemm_dims = {
        "hidden_size": config.hidden_size,
        "query latent (num_attention_heads * head_dim)": config.query_dim,
        "fused q|k|v projection width (Q + 2 * K)": config.query_dim + 2 * config.kv_dim,
        "moe_intermediate_size": config.moe_intermediate_size,
    }
    for name, value in gemm_dims.items():
        if value % GEMM_MULTIPLE:
            warnings.append(f"{name}={value} is not a multiple of {GEMM_MULTIPLE} (MI300X GEMM rule)")
    if config.vocab_size % VOCAB_MULTIPLE:
        warnings.append(f"vocab_size={config.vocab_size} is not a multiple of {VOCAB_MULTIPLE} (LM head GEMM rows)")
    if config.num_experts % expert_parallel:
        warnings.append(
            f"num_experts={config.num_experts} does not divide over expert_parallel={expert_parallel} ranks"
        )
    tokens_per_expert = micro_batch_size * seq_len * expert_parallel / config.num_experts
    if tokens_per_expert < MIN_TOKENS_PER_EXPERT:
        warnings.append(
            f"each expert sees ~{tokens_per_expert:.0f} tokens per micro-batch ({config.num_experts // expert_parallel}"
            f" experts per rank, micro-batch {micro_batch_size} x {seq_len}): below {MIN_TOKENS_PER_EXPERT} the expert "
            "GEMMs underfill the GPU; raise the micro-batch or seq_len"
        )
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# The plan


def _grid(config: ZayaConfig, counts: dict[str, int], cfg: PlanConfig, micro_batch_size: int, budget: int) -> dict:
    """memory_grid[optimizer][checkpointing|no_checkpointing][stage]: the memory at `micro_batch_size` and the
    largest micro-batch that fits."""
    grid: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
    for optimizer in OPTIMIZERS:
        grid[optimizer] = {}
        for checkpointing in (False, True):
            rows = {}
            for stage in ZERO_STAGES:
                mem = memory_per_gpu(
                    config, counts, stage, cfg.world_size, optimizer, cfg.precision, cfg.seq_len, micro_batch_size,
                    checkpointing,
                )
                mem["max_micro_batch"] = max_micro_batch(
                    config, counts, stage, cfg.world_size, optimizer, cfg.precision, cfg.seq_len, checkpointing, budget
                )
                rows[str(stage)] = mem
            grid[optimizer]["checkpointing" if checkpointing else "no_checkpointing"] = rows
    return grid


def build_plan(config: ZayaConfig, cfg: PlanConfig) -> dict[str, Any]:
    """The plan as a JSON-ready dict (no I/O). Headline: `cfg.optimizer`, `cfg.zero_stage`,
    `cfg.activation_checkpointing`, at `cfg.micro_batch_size` or, if None, the largest micro-batch that fits
    there (1 if none does, with a warning)."""
    counts = parameter_counts(config)
    flops = flops_per_token(config, cfg.seq_len)
    budget = usable_bytes(cfg.device_memory_bytes, cfg.memory_headroom)
    ckpt_key = "checkpointing" if cfg.activation_checkpointing else "no_checkpointing"
    fitting = max_micro_batch(
        config, counts, cfg.zero_stage, cfg.world_size, cfg.optimizer, cfg.precision, cfg.seq_len,
        cfg.activation_checkpointing, budget,
    )
    warnings: list[str] = []
    if cfg.micro_batch_size is not None:
        micro_batch, source = cfg.micro_batch_size, "given"
    else:
        micro_batch = choose_micro_batch(fitting, cfg.seq_len, cfg.world_size, cfg.global_batch_tokens)
        source = "largest that fits" if cfg.global_batch_tokens is None else "largest that fits and divides the global batch"
    grid = _grid(config, counts, cfg, micro_batch, budget)
    headline = {stage: {k: v for k, v in row.items()} for stage, row in grid[cfg.optimizer][ckpt_key].items()}
    if headline[str(cfg.zero_stage)]["total"] > budget:
        warnings.append(
            f"micro-batch {micro_batch} x {cfg.seq_len} does not fit at ZeRO-{cfg.zero_stage} ({cfg.optimizer}, "
            f"checkpointing {'on' if cfg.activation_checkpointing else 'off'}): "
            f"{headline[str(cfg.zero_stage)]['total'] / GIB:.1f} GiB > {budget / GIB:.1f} GiB usable"
        )
    tokens_per_step = micro_batch * cfg.seq_len * cfg.world_size
    global_tokens = cfg.global_batch_tokens if cfg.global_batch_tokens is not None else tokens_per_step
    accumulation = max(1, math.ceil(global_tokens / tokens_per_step))
    if global_tokens % tokens_per_step:
        warnings.append(
            f"global_batch_tokens={global_tokens} is not a multiple of micro-batch x seq_len x GPUs = "
            f"{tokens_per_step}; {accumulation} accumulation steps give {accumulation * tokens_per_step} tokens"
        )
    if cfg.seq_len > config.max_position_embeddings:
        warnings.append(f"seq_len={cfg.seq_len} exceeds max_position_embeddings={config.max_position_embeddings}")
    warnings += sizing_warnings(config, micro_batch, cfg.seq_len, cfg.expert_parallel)
    rate = throughput(flops["total"], cfg.world_size, cfg.spec.peak_bf16_flops, cfg.mfu)
    rate["step_time_s"] = accumulation * tokens_per_step / rate["tokens_per_s"]
    return {
        "model": {
            name: getattr(config, name)
            for name in (
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "router_hidden_size",
                "tie_word_embeddings",
            )
        },
        "cluster": {**dataclasses.asdict(cfg.spec), "nodes": cfg.nodes, "gpus_per_node": cfg.resolved_gpus_per_node,
                    "world_size": cfg.world_size, "device_memory_bytes": cfg.device_memory_bytes,
                    "usable_memory_bytes": budget},
        "settings": dataclasses.asdict(cfg),
        "total_parameters": counts["total"],
        "active_parameters": counts["active"],
        "parameters": counts,
        "flops_per_token": flops["total"],
        "flops_per_token_breakdown": flops,
        "activation_bytes_per_token_per_layer": {
            "no_checkpointing": layer_activation_bytes_per_token(config, cfg.precision),
            "checkpointing": checkpointed_layer_bytes_per_token(config, cfg.precision),
        },
        "micro_batch_size": micro_batch,
        "micro_batch_size_source": source,
        "gradient_accumulation_steps": accumulation,
        "global_batch_tokens": accumulation * tokens_per_step,
        "memory_per_gpu_bytes": headline,
        "memory_grid": grid,
        "throughput": rate,
        "warnings": warnings,
    }


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _count(value: float) -> str:
    return f"{value / 1e9:.3f}B" if value >= 1e9 else f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value:,.0f}"


def format_table(plan: dict[str, Any]) -> str:
    """The plan as text: parameters, FLOPs, a ZeRO x checkpointing memory table (GiB per GPU), throughput, and one
    line per warning."""
    s, c, p, f = plan["settings"], plan["cluster"], plan["parameters"], plan["flops_per_token_breakdown"]
    mbs, seq, opt = plan["micro_batch_size"], s["seq_len"], s["optimizer"]
    act = plan["activation_bytes_per_token_per_layer"]
    lines = [
        (f"plan: {c['nodes']} node(s) x {c['gpus_per_node']} {c['device']} = {c['world_size']} GPUs, "
         f"{_gib(c['device_memory_bytes'])} GiB each ({_gib(c['usable_memory_bytes'])} usable), "
         f"{c['peak_bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16 peak"),
        (f"parameters       total {_count(p['total'])} (embedding {_count(p['embedding'])}, non-embedding "
         f"{_count(p['total_non_embedding'])}); active {_count(p['active'])} without embedding "
         f"({_count(p['active_with_embedding'])} with it)"),
        (f"FLOPs per token  {f['total']:.3e} = 6 x active {f['dense']:.3e} + LM head {f['lm_head']:.3e} "
         f"+ attention {f['attention']:.3e} (seq_len {seq})"),
        (f"activations      {act['no_checkpointing']:,} B per token and layer ({act['checkpointing']:,} B with "
         "checkpointing)"),
        (f"memory per GPU in GiB, {s['precision']}, micro-batch {mbs} x {seq} ({plan['micro_batch_size_source']}); "
         f"totals use {opt}; max mb: the largest micro-batch that fits"),
    ]
    header = (f"{'ZeRO':>5} {'weights':>8} {'grads':>7} {'adamw':>7} {'muon':>7} | {'act':>7} {'total':>7} "
              f"{'max mb':>6} | {'ckpt act':>8} {'total':>7} {'max mb':>6}")
    lines += [header, "-" * len(header)]
    grid = plan["memory_grid"]
    for stage in ("0", "1", "2", "3"):
        off, on = grid[opt]["no_checkpointing"][stage], grid[opt]["checkpointing"][stage]
        adamw, muon = grid["adamw"]["no_checkpointing"][stage], grid["muon"]["no_checkpointing"][stage]
        mark = "*" if int(stage) == s["zero_stage"] else " "
        lines.append(
            f"{mark}{stage:>4} {_gib(off['weights']):>8} {_gib(off['gradients']):>7} {_gib(adamw['optimizer']):>7} "
            f"{_gib(muon['optimizer']):>7} | {_gib(off['activations']):>7} {_gib(off['total']):>7} "
            f"{off['max_micro_batch']:>6} | {_gib(on['activations']):>8} {_gib(on['total']):>7} "
            f"{on['max_micro_batch']:>6}"
        )
    t = plan["throughput"]
    ckpt = "on" if s["activation_checkpointing"] else "off"
    lines += [
        f"(* headline: ZeRO-{s['zero_stage']}, {opt}, checkpointing {ckpt})",
        (f"batch            {mbs} x {seq} tokens x {c['world_size']} GPUs x {plan['gradient_accumulation_steps']} "
         f"accumulation = {plan['global_batch_tokens']:,} tokens per step"),
        (f"throughput       at MFU {t['mfu']:.2f}: {t['tokens_per_s']:,.0f} tokens/s ({t['tokens_per_s_per_gpu']:,.0f} "
         f"per GPU), {t['step_time_s']:.2f} s per step, {t['days_per_trillion_tokens']:.2f} days per trillion tokens"),
    ]
    lines += [f"warning: {w}" for w in plan["warnings"]] or ["no warnings"]
    return "\n".join(lines)


def run_plan(
    model_config: ZayaConfig, plan_cfg: PlanConfig, run_dir: str | Path | None = None, echo: bool = True
) -> dict[str, Any]:
    """`recipe=plan`: builds the plan, prints its table (`echo`), writes `run_dir/plan.json` when `run_dir` is
    given, and returns the plan."""
    plan = build_plan(model_config, plan_cfg)
    if echo:
        print(format_table(plan), flush=True)
    if run_dir is not None:
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return plan
