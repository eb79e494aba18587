"""The train/inference gaps of `zaya_train.rl.loop`: the other routing's forward runs only over rows whose routing
differs from the engine's somewhere, and the gaps equal those of full forwards over the whole batch."""

from types import SimpleNamespace

import pytest
import torch

from zaya_train.loading import load_model
from zaya_train.rl.config import RLConfig
from zaya_train.rl.loop import RLSource, RoutingGaps, RowBatch
from zaya_train.rollout import RolloutEngine
from zaya_train.train.engine import DistInfo

TAMPERED_ROWS = (1, 4)
LAST_TOKEN_ROW = 6  # tampered only at its last token, which feeds no scored logprob


@pytest.fixture(scope="module")
def rollouts(policy):
    model = load_model(policy).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (8, 5), generator=generator).tolist()
    results = RolloutEngine(model).generate(prompts, max_new_tokens=12, seed=0, eos_token_id=[])
    rows = [(SimpleNamespace(prompt_ids=p, token_ids=r.token_ids, logprobs=r.logprobs, expert_ids=r.expert_ids.clone()),
             0.0) for p, r in zip(prompts, results)]
    # The engine "recorded" another expert for one response token of these rows: the trainer's routers disagree there.
    for row, position in [(row, 7) for row in TAMPERED_ROWS] + [(LAST_TOKEN_ROW, -1)]:
        ids_SL = rows[row][0].expert_ids
        ids_SL[position, 2] = (ids_SL[position, 2] + 1) % model.config.num_experts
    return model, RowBatch(rows, pad_id=0, num_layers=model.config.num_hidden_layers, device=torch.device("cpu"))


def brute_force_gap(model, batch: RowBatch, replay: bool) -> float:
    with torch.no_grad():
        out = model(batch.input_ids, labels=batch.labels, expert_ids=batch.expert_ids if replay else None,
                    return_logits=False, return_logprobs=True)
    return float(((out.logprobs - batch.engine_logp).abs() * batch.mask).max())


@pytest.mark.parametrize("router_replay", [True, False])
def test_the_other_routing_runs_only_where_routing_differs_and_matches_full_forwards(rollouts, router_replay):
    model, batch = rollouts
    source = object.__new__(RLSource)
    source.rl, source.info = RLConfig(router_replay=router_replay), DistInfo(0, 1, 0, torch.device("cpu"))
    source.sync = SimpleNamespace(partitioned=False)
    forwarded_rows: list[torch.Tensor] = []

    def engine(input_ids, **kwargs):
        forwarded_rows.append(input_ids)
        return model(input_ids, **kwargs)

    source.engine = engine
    with torch.no_grad():
        out = source._forward(batch, router_replay)
    forwarded_rows.clear()
    gaps = RoutingGaps(diagnose=True)
    other_routing = source._observe_routing(gaps, batch, out.logprobs.float(), out.router_ids)
    assert forwarded_rows == [], "the other routing runs when the caller says (after the backward)"
    other_routing()

    assert len(forwarded_rows) == 1
    other_rows = {tuple(row.tolist()) for row in forwarded_rows[0]}
    assert {tuple(batch.input_ids[r].tolist()) for r in TAMPERED_ROWS} <= other_rows
    assert tuple(batch.input_ids[LAST_TOKEN_ROW].tolist()) not in other_rows
    assert len(other_rows) < len(batch.input_ids)
    assert gaps.replay == pytest.approx(brute_force_gap(model, batch, replay=True), abs=1e-6)
    assert gaps.noreplay == pytest.approx(brute_force_gap(model, batch, replay=False), abs=1e-6)
    # Only replaying the tampered ids moves the logprobs away from the engine's (measured by the other routing's
    # forward over the tampered rows when the training forward does not replay).
    assert gaps.replay > 1e-3 and gaps.noreplay <= 1e-4
    assert gaps.mismatched >= len(TAMPERED_ROWS) + 1
    assert gaps.decisions == float(batch.real.sum()) * model.config.num_hidden_layers

    quiet = RoutingGaps(diagnose=False)
    assert source._observe_routing(quiet, batch, out.logprobs.float(), out.router_ids) is None
    assert quiet.mismatched == gaps.mismatched
