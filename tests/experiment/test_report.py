"""The experiment report against hand-computed differences, a loop-by-loop pooling and intervals recomputed from
the written results.json."""

import json

import numpy as np
import pytest

from zaya_train.experiment.report import build_results, outcome, verdict_text, write_outputs
from zaya_train.rsa.stats import bootstrap_ci, paired_bootstrap_ci, wilson_ci

P = 40
CONFIG = {"n": 8, "c": 4, "t": 3, "beta": 64, "tau": 16, "variant": "markovian"}


def payload(rounds, tokens=100.0, prompt=50):
    """An rsa_results.json payload from per-problem mean scores per round (multiples of 1/8, as with N=8);
    majority is 1 on a problem whose mean is >= 1/2, pass@N 1 when its mean is > 0."""
    out, cumulative = [], 0.0
    for t, means in enumerate(rounds):
        means = [float(m) for m in means]
        majorities = [float(m >= 0.5) for m in means]
        passed = sum(m > 0 for m in means)
        cumulative += tokens * (t + 1)
        out.append({
            "round": t, "mean_accuracy": sum(means) / len(means), "majority_accuracy": sum(majorities) / len(means),
            "pass_at_n": passed / len(means), "generated_tokens": tokens * (t + 1), "max_prompt_tokens": prompt + t,
            "cumulative_generated_tokens": cumulative, "mean_accuracy_ci": list(bootstrap_ci(means)),
            "majority_accuracy_ci": list(wilson_ci(sum(majorities), len(means))),
            "pass_at_n_ci": list(wilson_ci(passed, len(means))), "problem_mean_scores": means,
            "problem_majority_scores": majorities,
        })
    return {"config": CONFIG, "num_problems": len(rounds[0]), "rounds": out}


def scores(seed, low=3, high=6):
    """Per-problem means in eighths, low/8 to high/8 (chosen so that the offsets a test adds stay in [0, 1])."""
    return np.random.default_rng(seed).integers(low, high, size=P, endpoint=True) / 8


def shared():
    base = scores(1, 0, 4)
    warm = scores(2)
    return {"base": payload([base, base + 0.1, base + 0.2, base + 0.3]),
            "warmstart": payload([warm, warm, warm + 0.125, warm - 0.125])}


def arms(plain0, codesign_offsets, codesign0=None, seed_offset=0):
    codesign0 = plain0 - 0.05 if codesign0 is None else codesign0
    plain = payload([plain0, plain0 + 0.05, plain0 + 0.1, plain0 + 0.05], tokens=100.0 + seed_offset)
    codesign = payload([codesign0, *(plain0 + d for d in codesign_offsets)], tokens=120.0 + seed_offset,
                       prompt=60 + seed_offset)
    return {"plain_rl": plain, "codesign_rl": codesign}


COMPUTE = {"prefill": 1_000_000, "decode": 30_000, "trained": 20_000, "total": 1_050_000}


def test_outcome():
    assert outcome([0.01, 0.2]) == "gain"
    assert outcome([-0.2, -0.01]) == "loss"
    assert outcome([-0.1, 0.1]) == outcome([0.0, 0.0]) == outcome([0.0, 0.3]) == "no detectable difference"


@pytest.mark.parametrize("shift, expected, words", [
    (0.3, "gain", ("Co-design beat plain RL", "+30.0 points", "co-design helped")),
    (0.0, "no detectable difference", ("did not detectably beat", "+0.0 points", "at this sample size")),
    (-0.3, "loss", ("did not beat plain RL", "-30.0 points", "co-design hurt")),
])
def test_each_outcome_of_the_primary_comparison(shift, expected, words):
    plain0 = scores(3, 4, 5)
    # Round 2 is co-design's best RSA round, `shift` above plain RL's round 0 on every problem.
    results = build_results(shared(), {0: arms(plain0, [shift - 0.05, shift, shift - 0.1])}, {})
    primary = results["paired"]["primary"]
    assert primary["codesign_round"] == 2
    assert primary["diff"] == pytest.approx(shift)
    assert primary["ci"] == pytest.approx([shift, shift])  # the same shift on every problem: no spread
    assert primary["outcome"] == results["outcome"] == expected
    assert results["verdict"] == verdict_text(results)
    assert "round 2" in results["verdict"] and f"({plain0.mean():.3f})" in results["verdict"]
    assert f"over {P} held-out problems" in results["verdict"]
    assert all(w in results["verdict"] for w in words), results["verdict"]
    assert "selection effect" in results["verdict"]


def test_primary_takes_the_best_rsa_round_of_the_pooled_arm():
    plain0 = scores(4, 2, 5)
    # Round 0 is co-design's highest round but not an RSA round. Seed 0 peaks at round 1, seed 1 at round 3;
    # pooled, the means are +0.15, +0.25, +0.15 above plain RL's round 0: round 2 is best.
    codesign0 = np.minimum(plain0 + 0.35, 1.0)
    per_seed = {0: arms(plain0, [0.3, 0.25, 0.0], codesign0), 1: arms(plain0, [0.0, 0.25, 0.3], codesign0)}
    results = build_results(shared(), per_seed, {})
    assert results["paired"]["primary"]["codesign_round"] == 2
    assert results["paired"]["primary"]["diff"] == pytest.approx(0.25)
    assert results["seeds"]["0"]["paired"]["primary"]["codesign_round"] == 1
    assert results["seeds"]["1"]["paired"]["primary"]["codesign_round"] == 3
    assert "round 1" in results["seeds"]["0"]["verdict"] and "round 3" in results["seeds"]["1"]["verdict"]


def test_paired_differences_by_hand_and_reproducible_from_results_json(tmp_path):
    plain0 = scores(5)
    codesign0 = scores(6)
    results = build_results(shared(), {0: arms(plain0, [0.1, 0.2, -0.1], codesign0)}, {0: {"plain_rl": COMPUTE}})
    paths = write_outputs(results, tmp_path)
    saved = json.loads(paths["results"].read_text())
    paired = saved["paired"]

    # base's round t is its round 0 plus 0.1 * t on every problem.
    for entry, t in zip(paired["within"]["base"], [1, 2, 3], strict=True):
        assert entry["round"] == t and entry["diff"] == pytest.approx(0.1 * t) and entry["ci"] == pytest.approx(
            [0.1 * t] * 2)
    assert [e["diff"] for e in paired["within"]["warmstart"]] == pytest.approx([0.0, 0.125, -0.125])
    # co-design minus plain, per round: plain RL's rounds are plain0 + (0, 0.05, 0.1, 0.05)
    expected = [codesign0.mean() - plain0.mean(), 0.1 - 0.05, 0.2 - 0.1, -0.1 - 0.05]
    assert [e["diff"] for e in paired["codesign_minus_plain"]] == pytest.approx(expected)
    assert paired["primary"]["codesign_round"] == 2 and paired["primary"]["diff"] == pytest.approx(0.2)
    assert paired["codesign_round1_minus_round0"]["diff"] == pytest.approx((plain0 + 0.1).mean() - codesign0.mean())
    assert paired["majority"]["vs_plain_round0_majority"]["diff"] == pytest.approx(
        (plain0 + 0.2).mean() - (plain0 >= 0.5).mean())
    assert paired["majority"]["vs_own_round0_majority"]["diff"] == pytest.approx(
        (plain0 + 0.2).mean() - (codesign0 >= 0.5).mean())

    # Every interval is recomputed from the per-problem lists stored in results.json.
    def rounds(model, key="problem_mean_scores"):
        return [r[key] for r in saved["models"][model]["rounds"]]

    cd, pl = rounds("codesign_rl"), rounds("plain_rl")
    for model, entries in paired["within"].items():
        for e in entries:
            assert e["ci"] == list(paired_bootstrap_ci(rounds(model)[e["round"]], rounds(model)[0]))
    for e in paired["codesign_minus_plain"]:
        assert e["ci"] == list(paired_bootstrap_ci(cd[e["round"]], pl[e["round"]]))
    assert paired["primary"]["ci"] == list(paired_bootstrap_ci(cd[2], pl[0]))
    assert paired["codesign_round1_minus_round0"]["ci"] == list(paired_bootstrap_ci(cd[1], cd[0]))
    assert paired["majority"]["vs_plain_round0_majority"]["ci"] == list(
        paired_bootstrap_ci(cd[2], rounds("plain_rl", "problem_majority_scores")[0]))
    assert paired["majority"]["vs_own_round0_majority"]["ci"] == list(
        paired_bootstrap_ci(cd[2], rounds("codesign_rl", "problem_majority_scores")[0]))
    assert verdict_text(saved) == saved["verdict"]

    # One seed: the arms are the seed's payloads unchanged, and there is no per-seed section.
    assert "seeds" not in saved
    assert saved["models"]["plain_rl"]["rounds"] == arms(plain0, [0.1, 0.2, -0.1], codesign0)["plain_rl"]["rounds"]
    assert saved["compute"] == {"plain_rl": COMPUTE}
    assert saved["eval"] == {"config": CONFIG, "num_problems": P, "split": "test"}


def test_pooling_over_two_seeds(tmp_path):
    per_seed = {1: arms(scores(7, 1, 5), [0.1, 0.2, 0.0]), 2: arms(scores(8, 1, 5), [0.0, -0.1, 0.3], seed_offset=10)}
    compute = {1: {"plain_rl": COMPUTE, "codesign_rl": COMPUTE},
               2: {"plain_rl": {k: v + (3 if k == "total" else 1) for k, v in COMPUTE.items()}, "codesign_rl": COMPUTE}}
    results = build_results(shared(), per_seed, compute, extra={"wall_s": {"base": 12.4}})
    for arm in ("plain_rl", "codesign_rl"):
        pooled = results["models"][arm]
        assert pooled["num_problems"] == P and pooled["seeds"] == [1, 2]
        for t, r in enumerate(pooled["rounds"]):
            a, b = per_seed[1][arm]["rounds"][t], per_seed[2][arm]["rounds"][t]
            assert r["round"] == t
            for i in range(P):
                assert r["problem_mean_scores"][i] == pytest.approx(
                    (a["problem_mean_scores"][i] + b["problem_mean_scores"][i]) / 2)
                assert r["problem_majority_scores"][i] == pytest.approx(
                    (a["problem_majority_scores"][i] + b["problem_majority_scores"][i]) / 2)
            assert r["mean_accuracy"] == pytest.approx((a["mean_accuracy"] + b["mean_accuracy"]) / 2)
            assert r["majority_accuracy"] == pytest.approx((a["majority_accuracy"] + b["majority_accuracy"]) / 2)
            assert r["pass_at_n"] == pytest.approx((a["pass_at_n"] + b["pass_at_n"]) / 2)
            assert r["mean_accuracy_ci"] == list(bootstrap_ci(r["problem_mean_scores"]))
            votes = sum(a["problem_majority_scores"]) + sum(b["problem_majority_scores"])
            assert r["majority_accuracy_ci"] == pytest.approx(wilson_ci(votes, 2 * P))
            assert r["generated_tokens"] == pytest.approx((a["generated_tokens"] + b["generated_tokens"]) / 2)
            assert r["cumulative_generated_tokens"] == pytest.approx(
                (a["cumulative_generated_tokens"] + b["cumulative_generated_tokens"]) / 2)
            assert r["max_prompt_tokens"] == max(a["max_prompt_tokens"], b["max_prompt_tokens"])
    # seed 2's plain RL spent one token more of each kind than seed 1's: every mean ends in .5 and rounds to even;
    # the total is the sum of the rounded parts (the rounded mean total, 1_050_002, would not add up).
    assert results["compute"]["plain_rl"] == {"prefill": 1_000_000, "decode": 30_000, "trained": 20_000,
                                              "total": 1_050_000}
    assert results["compute"]["codesign_rl"] == COMPUTE
    assert results["models"]["base"]["rounds"] == shared()["base"]["rounds"]

    for seed in (1, 2):
        own = results["seeds"][str(seed)]
        assert set(own["models"]) == {"base", "warmstart", "plain_rl", "codesign_rl"}
        assert own["models"]["codesign_rl"]["rounds"] == per_seed[seed]["codesign_rl"]["rounds"]
        assert own["compute"] == compute[seed]
        assert own["outcome"] == own["paired"]["primary"]["outcome"] and "pooled" not in own["verdict"]
        assert len(own["paired"]["within"]["base"]) == 3
    assert results["seeds"]["1"]["paired"]["primary"]["codesign_round"] == 2
    assert results["seeds"]["2"]["paired"]["primary"]["codesign_round"] == 3
    assert "pooled over 2 RL seeds" in results["verdict"]

    paths = write_outputs(results, tmp_path)
    report = paths["report"].read_text()
    assert "## RL seed 1" in report and "## RL seed 2" in report
    assert results["seeds"]["2"]["verdict"] in report
    assert "base 12 s" in report  # wall time per stage, whole seconds


def test_report_and_plot(tmp_path):
    extra = {"export": {"path": "runs/x/hf", "generated_text": "A 42"}, "base_pretraining": {"greedy_accuracy": 0.9}}
    results = build_results(shared(), {0: arms(scores(9), [0.1, 0.2, 0.0])}, {0: {"plain_rl": COMPUTE,
                                                                                "codesign_rl": COMPUTE}}, extra)
    paths = write_outputs(results, tmp_path)
    assert set(paths) == {"results", "plot", "report"} and all(p.parent == tmp_path for p in paths.values())
    report = paths["report"].read_text()
    for model in ("base", "warmstart", "plain_rl", "codesign_rl"):
        round0 = results["models"][model]["rounds"][0]
        assert f"| 0 | {round0['mean_accuracy']:.3f} [" in report
    assert results["verdict"] in report and f"**Outcome: {results['outcome']}.**" in report
    assert "![" in report and "(rsa_scaling.png)" in report
    assert "1.05M" in report  # the compute table's totals
    assert "exported to `runs/x/hf` in Hugging Face format" in report and "`A 42`" in report
    assert "greedy accuracy 0.900" in report
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob("*.tmp"))


def test_without_the_rl_arms(tmp_path):
    results = build_results(shared(), {}, {})
    assert results["outcome"] is None and "seeds" not in results
    assert "needs both RL arms" in results["verdict"]
    assert set(results["models"]) == {"base", "warmstart"}
    assert set(results["paired"]) == {"within"} and results["compute"] == {} and results["run"] == {}
    paths = write_outputs(results, tmp_path)
    assert results["verdict"] in paths["report"].read_text()
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    # One arm is not enough for the verdict either.
    only_codesign = build_results(shared(), {0: {"codesign_rl": arms(scores(10), [0.1, 0.2, 0.0])["codesign_rl"]}}, {})
    assert only_codesign["outcome"] is None and "needs both RL arms" in only_codesign["verdict"]
    assert "primary" not in only_codesign["paired"] and "codesign_minus_plain" not in only_codesign["paired"]
    assert set(only_codesign["paired"]["majority"]) == {"vs_own_round0_majority"}
