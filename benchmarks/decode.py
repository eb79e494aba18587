"""Generation throughput: our RolloutEngine vs transformers' `generate` on the same weights, CPU fp32, greedy.

    python benchmarks/decode.py                          # nano, batch 16, 128-token prompts, 128 new tokens
    python benchmarks/decode.py --preset small --repeats 2 --threads 2

Both run in this process on identical weights (transformers' ZayaForCausalLM built from our config and loaded
with our state dict), interleaved repeat by repeat, median taken. Reported per implementation:
- prefill tokens/s: one cached forward over the batch of prompts (logits for the last position only);
- generate new tokens/s: batch x new tokens / wall time of a whole generate call (prefill included, EOS off);
- decode new tokens/s: the same with the prefill time taken off.
It also checks that both produce the same greedy tokens, and times each round of Markovian RSA runs with T = 1..4
on the engine (the time must grow linearly in T). The last line is `ratio=<ours / HF generate new tokens/s>`.

Shape suffixes: B batch, S prompt length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from zaya_train.hf import transformers_config
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rollout import RolloutEngine


def hf_twin(model: ZayaForCausalLM) -> transformers.ZayaForCausalLM:
    twin = transformers.ZayaForCausalLM(transformers_config(model.config)).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rsa-problems", type=int, default=4, help="problems for the RSA round timing (0 skips)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = ZayaForCausalLM(preset(args.preset)).eval()
    theirs = hf_twin(ours)
    engine = RolloutEngine(ours)
    config = ours.config
    ids_BS = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len))
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    runs = {
        "ours": dict(
            prefill=lambda: ours(ids_BS, use_cache=True, logits_to_keep=1),
            generate=lambda: [
                r.token_ids
                for r in engine.generate(
                    ids_BS.tolist(), args.new_tokens, temperature=0, eos_token_id=[], max_batch_size=args.batch
                )
            ],
        ),
        "hf": dict(
            prefill=lambda: theirs(ids_BS, use_cache=True, logits_to_keep=1),
            generate=lambda: theirs.generate(
                ids_BS, attention_mask=torch.ones_like(ids_BS), max_new_tokens=args.new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=pad,
            )[:, args.prompt_len :].tolist(),
        ),
    }
    times = {name: {"prefill": [], "generate": []} for name in runs}
    tokens = {}
    with torch.inference_mode():
        for name, run in runs.items():  # warm-up
            run["prefill"]()
            tokens[name] = run["generate"]()
        for _ in range(args.repeats):
            for name, run in runs.items():
                for phase in ("prefill", "generate"):
                    times[name][phase].append(timed(run[phase])[0])

    prompt_tokens, new_tokens = args.batch * args.prompt_len, args.batch * args.new_tokens
    print(
        f"preset={args.preset} batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} "
        f"threads={args.threads} repeats={args.repeats} (median)"
    )
    print(f"{'impl':<6}{'prefill tok/s':>16}{'generate new tok/s':>22}{'decode new tok/s':>20}{'generate s':>13}")
    rates = {}
    for name in runs:
        prefill_s = statistics.median(times[name]["prefill"])
        generate_s = statistics.median(times[name]["generate"])
        rates[name] = new_tokens / generate_s
        print(
            f"{name:<6}{prompt_tokens / prefill_s:>16,.0f}{rates[name]:>22,.0f}"
            f"{new_tokens / max(generate_s - prefill_s, 1e-9):>20,.0f}{generate_s:>13.3f}"
        )
    same = sum(a == b for a, b in zip(tokens["ours"], tokens["hf"]))
    print(f"greedy sequences identical to HF: {same}/{args.batch}")
    if args.rsa_problems:
        rsa_round_times(engine, config, args)
    print(f"ratio={rates['ours'] / rates['hf']:.3f}")


def rsa_round_times(engine: RolloutEngine, config, args) -> None:
    """Wall time per round of Markovian RSA runs with T = 1..4 on the engine: with a bounded prompt (question +
    C tails of tau tokens) every aggregation round costs the same, so a run's time must grow linearly in T."""
    from zaya_train.rsa import RSAConfig, RSAProblem, TextAggregationTemplate, run_rsa

    problems = [
        RSAProblem(problem_id=i, prompt_ids=torch.randint(3, config.vocab_size, (32,)).tolist())
        for i in range(args.rsa_problems)
    ]
    template = TextAggregationTemplate.from_text(lambda text: [3 + (ord(ch) % (config.vocab_size - 3)) for ch in text],
                                                 max_candidates=4)
    round_times: list[float] = []

    def generate(prompts, max_new_tokens, seed):
        start = time.perf_counter()
        results = engine.generate(prompts, max_new_tokens, temperature=1.0, seed=seed, eos_token_id=[],
                                  max_batch_size=args.batch * 4)
        round_times.append(time.perf_counter() - start)
        return results

    print(f"Markovian RSA, {args.rsa_problems} problems, N=8 C=4 beta=64 tau=16, EOS off (every rollout 64 tokens):")
    print(f"{'T':>3}{'total s':>10}{'s per round (round 0, 1, ...)':>40}{'total / (T + 1)':>18}")
    for t in range(1, 5):
        round_times.clear()
        rsa = RSAConfig(n=8, c=4, t=t, beta=64, tau=16, seed=0)
        run_rsa(problems, generate, lambda problem, ids: (0.0, None), rsa, template)
        per_round = " ".join(f"{x:.2f}" for x in round_times)
        print(f"{t:>3}{sum(round_times):>10.2f}{per_round:>40}{sum(round_times) / (t + 1):>18.2f}")


if __name__ == "__main__":
    main()
