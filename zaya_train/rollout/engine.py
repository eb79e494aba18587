"""The rollout engine: batched sampling on ZAYA1's native decode cache (prefill + decode) with continuous batching.

    from zaya_train.rollout import RolloutEngine
    engine = RolloutEngine(model)                          # a live ZayaForCausalLM; its weights are used in place
    engine = RolloutEngine.from_pretrained("ckpt/")        # an HF `zaya` dir, a trainer checkpoint or a run dir
    results = engine.generate([[1, 5, 9], [1, 7]], max_new_tokens=64, temperature=1.0, top_p=0.95, seed=0)
    r = results[0]; r.token_ids, r.logprobs, r.expert_ids, r.finish_reason   # expert_ids: prompt + new tokens
    engine.load_weights(trainer_model_or_state_dict)       # after a policy update

How a call runs: up to `max_batch_size` requests are prefilled together (left-padded, positions restart at each
prompt's first token; identical prompts, such as a GRPO group's, are run once and their cache rows copied) and
then decoded one token per step (`zaya_train.model.decode.DecodeStep`; the general forward for ZeRO-3-partitioned
weights, which only it gathers). A row that has finished takes part in exactly one
more step, which feeds its final token so that token's routing is recorded too, and then leaves the batch
(`ZayaCache.select`); waiting requests are prefilled on their own and appended to the running batch
(`ZayaCache.extend`, which right-aligns the two caches). Cache memory is held for the live rows only.

Shape suffixes: B live rows, S prompt width (longest prompt of a prefill group), V vocab, L layers.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from zaya_train.loading import load_model
from zaya_train.model import ZayaCache, ZayaForCausalLM
from zaya_train.model.decode import DecodeStep
from zaya_train.model.state import check_state_dict
from zaya_train.rollout.sampling import UniformStream, draw_uniforms, request_generator, sample

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class RolloutResult:
    """One request's generation. `token_ids`: new tokens only, including the EOS or stop tokens that ended it.
    `logprobs[i]`: log-probability of token_ids[i] under log_softmax(logits / temperature) over the full
    vocabulary, before top-k/top-p truncation (log_softmax(logits) when temperature is 0).
    `expert_ids` [len(prompt) + len(token_ids), num_layers]: router class per layer (num_experts = skip) at every
    position of prompt + token_ids, i.e. exactly what a teacher-forced forward over that row routes, and the
    `expert_ids` argument of `ZayaForCausalLM.forward` that replays it (router replay in RL)."""

    token_ids: list[int]
    logprobs: list[float]
    expert_ids: torch.Tensor
    finish_reason: str


@dataclass
class _Request:
    index: int
    prompt: list[int]
    max_new_tokens: int
    uniforms: UniformStream | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    expert_ids: torch.Tensor | None = None  # the prompt's, until generation ends


@dataclass
class _Sampling:
    temperature: float
    top_p: float
    top_k: int
    eos_ids: frozenset[int]
    stop_sequences: list[list[int]]


class RolloutEngine:
    """`compile=True` runs the decode step through torch.compile (`DecodeStep`): the first calls compile it (tens
    of seconds on a CPU, where it needs a C++ compiler), later ones decode faster, with logprobs that differ from
    the eager step's by float rounding."""

    def __init__(self, model: ZayaForCausalLM, compile: bool = False) -> None:
        if not isinstance(model, ZayaForCausalLM):
            raise TypeError(f"model must be a zaya_train ZayaForCausalLM, got {type(model).__name__}")
        self.model = model
        self.decode_step = DecodeStep(model, compile=compile)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        compile: bool = False,
    ) -> RolloutEngine:
        """An engine on an HF `zaya` checkpoint directory, a trainer checkpoint or a run directory (its latest
        checkpoint)."""
        return cls(load_model(path).to(device=device, dtype=dtype).eval(), compile=compile)

    @torch.no_grad()
    def load_weights(self, state_dict_or_model: nn.Module | dict[str, torch.Tensor]) -> None:
        """Copies new weights (and the routers' balancing biases) into the engine's model in place, cast to its
        dtype and device. `state_dict_or_model` is a ZayaForCausalLM (or any module with the same state-dict
        names) or a state dict; a tied `lm_head.weight` may be absent, as in HF exports."""
        source = state_dict_or_model
        if source is self.model:
            # Trained in place: its weights may have changed in ways the cached fused weights cannot see.
            self.decode_step.invalidate()
            return
        if isinstance(source, nn.Module):
            state = source.state_dict()
        elif isinstance(source, dict):
            state = dict(source)
        else:
            raise TypeError(f"state_dict_or_model must be a module or a state dict, got {type(source).__name__}")
        state = check_state_dict(state, self.model, source="state_dict_or_model")
        self.model.load_state_dict(state, strict=True)
        self.decode_step.invalidate()

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int | list[int] = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_sequences: list[list[int]] | None = None,
        max_batch_size: int = 64,
    ) -> list[RolloutResult]:
        """Generates a continuation of every prompt; returns one `RolloutResult` per prompt, in order.

        `temperature` 0 is greedy. `top_k` 0 and `top_p` 1 disable those filters. `eos_token_id` defaults to the
        model config's (`[]` disables EOS). A request ends with finish_reason "eos" when it samples an EOS token,
        "stop" when its new tokens end with one of `stop_sequences`, "length" after its `max_new_tokens` (an int
        or one per prompt); the first that applies, in that order.

        Randomness: request i's k-th token uses the k-th uniform of its own generator, seeded from (seed, i).
        Guaranteed: the same call (prompts, parameters, seed, max_batch_size) on the same weights, device and
        threads returns the same tokens. Request i's random stream does not depend on the other requests or on
        `max_batch_size`, so its tokens change with batch composition only where batched arithmetic rounds the
        logits differently and a uniform falls within that rounding of a CDF boundary (or, greedy, an argmax is
        that close to a tie): rare, but not excluded. `seed=None` picks a fresh random seed.
        """
        config = self.model.config
        requests, params = self._validate(
            prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, eos_token_id, stop_sequences, max_batch_size
        )
        device = next(self.model.parameters()).device
        pending = deque(requests)
        rows: list[_Request] = []
        cache = ZayaCache(config)
        inputs_B = torch.empty(0, dtype=torch.long, device=device)
        positions_B = torch.empty(0, dtype=torch.long, device=device)
        # Per decode step: the request index of every row and the routing of the token each row was fed.
        expert_log: list[tuple[list[int], torch.Tensor]] = []
        # ZeRO-3 gathers partitioned weights only inside its leaf modules' forwards, which DecodeStep bypasses.
        partitioned = any(hasattr(p, "ds_id") for p in self.model.parameters())

        while pending or rows:
            free = max_batch_size - len(rows)
            if free and pending:
                admitted = [pending.popleft() for _ in range(min(free, len(pending)))]
                logits_BV, new_cache = self._prefill(admitted, device)
                first_B = self._sample(admitted, logits_BV, params)
                rows += admitted
                # Each row feeds one token per step until its last token is fed: room for the longest of them, and
                # one slot more, so that the buffers never fill exactly (a compiled decode step would compile once
                # more for the step whose keys span the whole buffer).
                remaining = max(r.max_new_tokens - len(r.tokens) + 2 for r in rows)
                cache.extend(new_cache, capacity=max(cache.seq_len, new_cache.seq_len) + remaining)
                inputs_B = torch.cat([inputs_B, first_B])
                positions_B = torch.cat([positions_B, torch.tensor([len(r.prompt) for r in admitted], device=device)])

            if partitioned:
                out = self.model(
                    inputs_B[:, None], position_ids=positions_B[:, None], cache=cache, return_expert_ids=True
                )
                logits_BV, expert_ids_BL = out.logits[:, -1], out.expert_ids[:, 0]
            else:
                logits_BV, expert_ids_BL = self.decode_step(inputs_B, positions_B, cache)
            expert_log.append(([r.index for r in rows], expert_ids_BL))
            live = [i for i, r in enumerate(rows) if r.finish_reason is None]
            if len(live) < len(rows):
                live_B = torch.tensor(live, dtype=torch.long, device=device)
                cache.select(live_B)
                logits_BV, positions_B = logits_BV.index_select(0, live_B), positions_B.index_select(0, live_B)
                rows = [rows[i] for i in live]
            inputs_B = self._sample(rows, logits_BV, params) if rows else inputs_B[:0]
            positions_B = positions_B + 1

        expert_ids = self._collect_expert_ids(expert_log, len(requests))
        return [
            RolloutResult(r.tokens, r.logprobs, torch.cat([r.expert_ids, ids_NL]), r.finish_reason)
            for r, ids_NL in zip(requests, expert_ids)
        ]

    def _prefill(self, admitted: list[_Request], device: torch.device) -> tuple[torch.Tensor, ZayaCache]:
        """Runs the admitted prompts, left-padded to a common width, into a fresh cache; returns last logits.
        Identical prompts (a GRPO group's G samples of one problem) run once; their cache rows are then copied."""
        config = self.model.config
        first_of: dict[tuple[int, ...], int] = {}
        source_B = [first_of.setdefault(tuple(r.prompt), len(first_of)) for r in admitted]
        prompts = [list(prompt) for prompt in first_of]
        width = max(len(p) for p in prompts)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        ids_US = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask_US = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        cache = ZayaCache(config, initial_capacity=width)
        out = self.model(
            ids_US, attention_mask=mask_US, position_ids=(mask_US.cumsum(-1) - 1).clamp_min(0), cache=cache,
            return_expert_ids=True, logits_to_keep=1,
        )
        expert_ids_USL = out.expert_ids.cpu()
        for r, u in zip(admitted, source_B):
            r.expert_ids = expert_ids_USL[u, width - len(r.prompt) :]
        logits_UV = out.logits[:, -1]
        if len(prompts) == len(admitted):
            return logits_UV, cache
        rows_B = torch.tensor(source_B, device=device)
        cache.select(rows_B)
        return logits_UV.index_select(0, rows_B), cache

    @staticmethod
    def _sample(rows: list[_Request], logits_BV: torch.Tensor, params: _Sampling) -> torch.Tensor:
        """Samples one token per row, appends it to its request and decides whether the request has finished."""
        uniforms_B = None if params.temperature == 0 else draw_uniforms([r.uniforms for r in rows])
        tokens_B, logprobs_B = sample(logits_BV, params.temperature, params.top_p, params.top_k, uniforms_B)
        for r, token, logprob in zip(rows, tokens_B.tolist(), logprobs_B.tolist()):
            r.tokens.append(token)
            r.logprobs.append(logprob)
            if token in params.eos_ids:
                r.finish_reason = "eos"
            elif params.stop_sequences and any(r.tokens[-len(stop) :] == stop for stop in params.stop_sequences):
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.max_new_tokens:
                r.finish_reason = "length"
        return tokens_B

    @staticmethod
    def _collect_expert_ids(
        expert_log: list[tuple[list[int], torch.Tensor]], num_requests: int
    ) -> list[torch.Tensor]:
        """Regroups the per-step routing by request; a stable sort keeps each request's steps in token order."""
        request_N = torch.tensor([i for indices, _ in expert_log for i in indices], dtype=torch.long)
        ids_NL = torch.cat([ids_BL for _, ids_BL in expert_log]).cpu()
        order_N = torch.argsort(request_N, stable=True)
        counts = torch.bincount(request_N, minlength=num_requests).tolist()
        return list(ids_NL.index_select(0, order_N).split(counts))

    def _validate(
        self, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, eos_token_id, stop_sequences, max_batch_size
    ) -> tuple[list[_Request], _Sampling]:
        config = self.model.config
        vocab = config.vocab_size

        def token_list(value, name: str) -> list[int]:
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a list of token ids, got {type(value).__name__}")
            tokens = list(value)
            if not tokens:
                raise ValueError(f"{name} is empty")
            for pos, token in enumerate(tokens):
                if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                    raise ValueError(f"{name}[{pos}]={token!r} is not a token id in [0, {vocab})")
            return tokens

        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
            raise ValueError(f"prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}")
        prompts = [token_list(p, f"prompt_ids[{i}]") for i, p in enumerate(prompt_ids)]
        if not prompts:
            raise ValueError("prompt_ids is empty: pass at least one prompt")

        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {len(prompts)} prompts")
            limits = list(max_new_tokens)
        else:
            limits = [max_new_tokens] * len(prompts)
        for i, (prompt, limit) in enumerate(zip(prompts, limits)):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"max_new_tokens must be a positive integer (or a list of them), got {limit!r}")
            if len(prompt) + limit > config.max_position_embeddings:
                raise ValueError(
                    f"max_new_tokens={limit} for prompt_ids[{i}] of {len(prompt)} tokens exceeds the model's "
                    f"max_position_embeddings={config.max_position_embeddings}"
                )

        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if seed is None:
            seed = secrets.randbits(63)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")

        if eos_token_id is None:
            eos_token_id = config.eos_token_id
        eos_list = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        eos_list = [t for t in eos_list if t is not None]
        eos_ids = frozenset(token_list(eos_list, "eos_token_id")) if eos_list else frozenset()
        stops = [token_list(s, f"stop_sequences[{i}]") for i, s in enumerate(stop_sequences or [])]

        requests = [
            _Request(i, prompt, limit, UniformStream(request_generator(seed, i)) if temperature > 0 else None)
            for i, (prompt, limit) in enumerate(zip(prompts, limits))
        ]
        return requests, _Sampling(float(temperature), float(top_p), top_k, eos_ids, stops)
