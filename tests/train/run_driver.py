"""Runs one training job through the Python API and reports what the tests check (run under torchrun or alone).

    python tests/train/run_driver.py RESULT.json recipe=nano_pretrain key=value ...

Writes RESULT.json from rank 0: the summary, and the largest difference between any two ranks' parameters and
balancing biases at the end (gathered in full under ZeRO-3). ZAYA_TEST_DUMP_WEIGHTS=path.pt also saves rank 0's
final weights there: {name: fp32 tensor} for every parameter (whole, gathered under ZeRO-3) and every router's
`balancing_biases` buffer; ZAYA_TEST_DUMP_INITIAL=path.pt saves the initial model's state dict (one process only).
Fault injection for the resume tests:
ZAYA_TEST_SIGTERM_AT_STEP=k sends this process SIGTERM once step k is logged; ZAYA_TEST_SIGKILL_IN_CHECKPOINT=n
kills it with SIGKILL in the middle of writing its n-th checkpoint; ZAYA_TEST_NAN_LOSS_STEPS=3,4 makes the loss
NaN at those training forwards (1-based micro-batch counts: optimizer steps when gradient accumulation is 1).
recipe=rl and recipe=warmstart run their batch sources. ZAYA_TEST_REWARD_DIGIT=d scores an RL completion by the fraction of its
characters that are the digit d (a reward a random policy can climb, for tests that need non-zero advantages);
ZAYA_TEST_CHECK_SYNC=1 makes the result hold `sync_logprob_diff`: after the last step, the rollout engine generates
and its logprobs are compared with a fresh model built from the trainer's final (gathered) weights.
ZAYA_TEST_RELABEL_ROUTING_RANK=r makes rank r's RL batches record another expert for row 0's second token at
layer 0 than the engine chose, so the trainer's routers disagree with "the engine" there, on that rank only.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from zaya_train import metrics
from zaya_train.cli import compose_run_config
from zaya_train.cli import source_factory as cli_source_factory
from zaya_train.train import checkpoint


def rank_spread(engine) -> dict[str, float]:
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    dump = os.environ.get("ZAYA_TEST_DUMP_WEIGHTS")
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        flat = torch.cat([p.detach().float().flatten() for p in params])
        if dump and dist.get_rank() == 0:
            weights = {name: p.detach().float().clone() for name, p in module.named_parameters()}
            weights.update({name: b.detach().float().clone() for name, b in module.named_buffers()
                            if name.endswith("balancing_biases")})
            torch.save(weights, dump)
    biases = torch.cat([r.balancing_biases.detach().float() for r in module.routers()])
    spread = {}
    for name, local in (("params", flat), ("biases", biases)):
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        spread[f"max_{name}_diff"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
    # The expert biases start at 0; the balancer must have moved them (the skip class stays at -1).
    expert_biases = torch.stack([r.balancing_biases[:-1].detach() for r in module.routers()])
    spread["biases_moved"] = bool((expert_biases != 0).any())
    return spread


def inject_faults() -> None:
    sigterm_at = int(os.environ.get("ZAYA_TEST_SIGTERM_AT_STEP", "0"))
    if sigterm_at:
        log = metrics.MetricsSink.log

        def log_then_signal(self, step, loss, values=None):
            log(self, step, loss, values)
            if step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)

        metrics.MetricsSink.log = log_then_signal
    kill_in = int(os.environ.get("ZAYA_TEST_SIGKILL_IN_CHECKPOINT", "0"))
    if kill_in:
        rng_state = checkpoint.rng_state
        calls = []

        def rng_state_then_kill():
            calls.append(1)
            if len(calls) == kill_in:  # DeepSpeed's files are written, ours are not, nothing is renamed yet
                os.kill(os.getpid(), signal.SIGKILL)
            return rng_state()

        checkpoint.rng_state = rng_state_then_kill


def inject_nan_losses() -> None:
    steps = {int(s) for s in os.environ.get("ZAYA_TEST_NAN_LOSS_STEPS", "").split(",") if s}
    if not steps:
        return
    from zaya_train.model import ZayaForCausalLM

    forward = ZayaForCausalLM.forward
    calls = []

    def forward_with_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and out.loss is not None:
            calls.append(1)
            if len(calls) in steps:
                out.loss = out.loss * float("nan")
        return out

    ZayaForCausalLM.forward = forward_with_nan


def dump_initial_weights() -> None:
    path = os.environ.get("ZAYA_TEST_DUMP_INITIAL")
    if not path:
        return
    from zaya_train.train import trainer

    initial_model = trainer._initial_model

    def initial_model_then_dump(cfg, model_config):
        model = initial_model(cfg, model_config)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
        return model

    trainer._initial_model = initial_model_then_dump


def patch_rl(source_class, report: dict) -> None:
    digit = os.environ.get("ZAYA_TEST_REWARD_DIGIT")
    if digit:
        from zaya_train.rl import prompts

        class DigitShare:
            def score(self, completion: str, reference) -> float:
                return completion.count(digit) / max(len(completion), 1)

        from zaya_train.rl import loop

        make_source = loop.environment_source

        def with_digit_reward(rl, seed):
            source = make_source(rl, seed)
            return prompts.PromptSource(source.rows, DigitShare(), source.seed, source.shuffle_rows)

        loop.environment_source = with_digit_reward
    relabel_rank = os.environ.get("ZAYA_TEST_RELABEL_ROUTING_RANK")
    if relabel_rank is not None:
        batch_of = source_class._batch

        def relabelled(self, rows, weights):
            batch = batch_of(self, rows, weights)
            if self.info.rank == int(relabel_rank):
                ids = batch.expert_ids
                ids[0, 1, 0] = (ids[0, 1, 0] + 1) % self.engine.module.config.num_experts
            return batch

        source_class._batch = relabelled
    if os.environ.get("ZAYA_TEST_CHECK_SYNC"):
        finish = source_class.finish

        def finish_then_check(self, engine, step, loss, metrics, info):
            finish(self, engine, step, loss, metrics, info)
            report["sync_logprob_diff"] = sync_logprob_diff(self, engine)

        source_class.finish = finish_then_check


def sync_logprob_diff(source, engine) -> float:
    """max |engine logprob - fresh forward logprob| over sampled tokens, the fresh model built from the gathered
    trainer weights (router replay on, so routing flips cannot hide or fake a difference)."""
    import deepspeed

    from zaya_train.model import ZayaForCausalLM

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fresh = ZayaForCausalLM(module.config)
    fresh.load_state_dict(state)
    fresh.eval()
    prompts = [[source.tokenizer.bos_token_id, *source.collector.encode("Q12+34+56+78+90+11=")]] * 4
    results = source.sync.rollout.generate(prompts, max_new_tokens=12, seed=7, temperature=1.0)
    worst = 0.0
    for prompt, r in zip(prompts, results):
        ids = torch.tensor([prompt + r.token_ids])
        with torch.no_grad():
            out = fresh(ids, labels=ids, expert_ids=r.expert_ids[None], return_logits=False, return_logprobs=True)
        fresh_logp = out.logprobs[0, len(prompt) - 1: len(prompt) - 1 + len(r.token_ids)]
        worst = max(worst, float((fresh_logp - torch.tensor(r.logprobs)).abs().max()))
    return worst


def main() -> None:
    result_path, *args = sys.argv[1:]
    recipe = "nano_pretrain"
    overrides = []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    cfg = compose_run_config(recipe, overrides)
    dump_initial_weights()
    inject_faults()
    inject_nan_losses()
    from zaya_train.train.trainer import TrainingDiverged, train

    report = {}
    source_factory = cli_source_factory(recipe)
    if recipe == "rl":
        patch_rl(source_factory, report)
    try:
        summary = train(cfg, Path(cfg.run_dir), on_finish=lambda engine: report.update(rank_spread(engine)),
                        source_factory=source_factory)
    except TrainingDiverged as err:
        summary = {"diverged": str(err)}
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps({**summary, **report}))
    dist.destroy_process_group()
    # Once in ~30 CI runs a rank aborted in C++ static destructors after everything above had finished ("terminate
    # called without an active exception"); the result is written, so leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
