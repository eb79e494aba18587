"""`rl.filter`: problems the starting policy solves at the pass rate or more are dropped before the first step, the
decision is written once and read back on resume, and training then cycles over the kept problems."""

import json

import torch

from zaya_train.data import NANO_CHARS, char_tokenizer
from zaya_train.model import ZayaForCausalLM, preset
from zaya_train.rl.config import FilterConfig, RLConfig
from zaya_train.rl.filtering import FILTER_FILE, filter_solved
from zaya_train.rl.prompts import PromptSource
from zaya_train.rl.rollouts import RolloutCollector
from zaya_train.rollout import RolloutEngine
from zaya_train.rsa import RSAConfig

SAMPLES = 4


class ScriptedPassRate:
    """Sample k of a problem is correct when k < rate * SAMPLES: the problem's pass rate is exactly `rate`."""

    def __init__(self):
        self.seen: dict[float, int] = {}

    def score(self, completion, rate):
        k = self.seen.get(rate, 0)
        self.seen[rate] = k + 1
        return float(k % SAMPLES < rate * SAMPLES)


def test_problems_solved_at_the_pass_rate_or_more_are_dropped_once(tmp_path):
    tokenizer = char_tokenizer(NANO_CHARS)
    torch.manual_seed(0)
    model = ZayaForCausalLM(preset("nano", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    rates = [0.0, 1.0, 0.5, 0.75, 0.25, 1.0]
    rows = [(f"Q{i}+1=", rate) for i, rate in enumerate(rates)]
    source = PromptSource(rows, ScriptedPassRate(), 0, shuffle_rows=False)
    rl = RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4,
                  filter=FilterConfig(pass_rate=0.75, samples=SAMPLES, pool=len(rates)))
    collector = RolloutCollector(RolloutEngine(model), tokenizer, source, rl, RSAConfig(n=2, c=2), seed=0)
    result = filter_solved(collector, rl, seed=0, run_dir=tmp_path, rank=0, world_size=1)
    # By hand: rates 1.0, 0.75 and 1.0 reach 0.75; 0, 0.5 and 0.25 stay.
    assert result["kept"] == [0, 2, 4] and (result["examined"], result["dropped"]) == (6, 3)
    assert json.loads((tmp_path / FILTER_FILE).read_text()) == result
    # A resumed run reads the decision back instead of sampling again with its (no longer starting) policy.
    calls = sum(source.verifier.seen.values())
    assert filter_solved(collector, rl, seed=0, run_dir=tmp_path, rank=0, world_size=1) == result
    assert sum(source.verifier.seen.values()) == calls


def test_a_shuffled_jsonl_is_examined_whole_when_smaller_than_the_pool(tmp_path):
    from zaya_train.rl.filtering import pool_size

    source = PromptSource([("q", "a")] * 5, ScriptedPassRate(), 0, shuffle_rows=True)
    assert pool_size(source, 256) == 5 and pool_size(source, 3) == 3
    generated = PromptSource([("q", "a")] * 5, ScriptedPassRate(), 0, shuffle_rows=False)
    assert pool_size(generated, 256) == 256
