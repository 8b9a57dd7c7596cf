"""Experiments without a server: assignment, statistics (A/A false positives, power, sample size), the event
store's validation, idempotence and atomicity (a writer killed mid-batch), and the report."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.client.experiments import Arm, EventError, EventStore, Experiment, ExperimentError
from bert_recsys.client.experiments import report as reporting
from bert_recsys.client.experiments.design import bucket
from bert_recsys.client.experiments.simulate import Behaviour, ClickModel, replay_into_store, run_once, simulate_tests
from bert_recsys.client.experiments.stats import (RatioStats, always_valid_p, compare, msprt_power, non_inferior,
                                      users_needed, wilson)
from bert_recsys.client.recall import RecallChannel

AB = Experiment("ab", (Arm("a"), Arm("b")))


# ---- design ---------------------------------------------------------------------------------------------------
def test_assignment_is_deterministic_weighted_and_independent_across_salts():
    e = Experiment("abn", (Arm("a", weight=2), Arm("b"), Arm("c")))
    users = range(40_000)
    arms = [e.assign(u).name for u in users]
    assert arms == [e.assign(u).name for u in users]  # the same user, the same arm, every time
    shares = {a: arms.count(a) / len(arms) for a in "abc"}
    assert abs(shares["a"] - 0.5) < 0.01 and abs(shares["b"] - 0.25) < 0.01 and abs(shares["c"] - 0.25) < 0.01
    other = Experiment("other", (Arm("a", weight=2), Arm("b"), Arm("c")))
    same = np.mean([other.assign(u).name == a for u, a in zip(users, arms)])
    assert abs(same - (0.5**2 + 0.25**2 + 0.25**2)) < 0.015  # independent: agreement only by chance


def test_bucket_handles_string_and_int_ids_alike():
    assert bucket("s", 42, (1, 1)) == bucket("s", "42", (1, 1))


@pytest.mark.parametrize("bad, field", [
    (dict(name="x", arms=(Arm("a"),)), "two arms"),
    (dict(name="x", arms=(Arm("a"), Arm("a"))), "repeat"),
    (dict(name="bad name", arms=(Arm("a"), Arm("b"))), "experiment name"),
    (dict(name="x", arms=(Arm("a"), Arm("b")), metric="revenue"), "metric"),
    (dict(name="x", arms=(Arm("a"), Arm("b")), alpha=0.7), "alpha"),
])
def test_bad_experiments_are_refused_with_the_field_named(bad, field):
    with pytest.raises(ExperimentError, match=field):
        Experiment(**bad)


def test_arm_fields_are_checked_and_round_trip_through_json():
    with pytest.raises(ExperimentError, match="weight"):
        Arm("a", weight=0)
    with pytest.raises(ExperimentError, match="unknown recall channel"):
        Arm("a", channels=("cooccurence",))
    with pytest.raises(ExperimentError, match="unknown experiment fields"):
        Experiment.from_json({"name": "x", "arms": [{"name": "a"}, {"name": "b"}], "salt2": "y"})
    e = Experiment("x", (Arm("a"), Arm("b", encoder_version=3, channels=("semantic",),
                                            channel_weights={"semantic": 0.5}, diversify=False)))
    again = Experiment.parse(json.dumps(e.to_json()))
    assert again == e and again.arm("b").channels == (RecallChannel.SEMANTIC,)


# ---- statistics ---------------------------------------------------------------------------------------------
def test_ratio_variance_matches_the_spread_over_repeated_samples():
    rng = np.random.default_rng(0)
    ratios, variances = [], []
    for _ in range(400):
        shown = rng.integers(1, 30, size=500)
        rates = rng.beta(2, 30, size=500)  # users differ: clicks are correlated within a user
        clicks = rng.binomial(shown, rates)
        stats = RatioStats.of(clicks, shown)
        ratios.append(stats.ratio), variances.append(stats.variance)
    assert np.var(ratios) == pytest.approx(np.mean(variances), rel=0.15)


def synthetic_behaviour(users=600, n=10, seed=1) -> Behaviour:
    rng = np.random.default_rng(seed)
    lists = {u: list(range(u, u + n)) for u in range(users)}
    future = {u: {int(i): float(rng.choice([4.0, 4.5, 5.0]))
                  for i in rng.choice(range(u, u + 40), size=int(rng.integers(0, 8)), replace=False)}
              for u in range(users)}
    return Behaviour.of(lists, future, ClickModel(), n)


def test_always_valid_test_keeps_false_positives_under_alpha_when_read_twenty_times():
    behaviour, rng = synthetic_behaviour(), np.random.default_rng(7)
    runs = [run_once(behaviour, 4000, f"aa-{r}", 0.0, rng, reads=20, mde=0.1, alpha=0.05) for r in range(300)]
    always_valid = np.mean([r["always_valid"].any() for r in runs])
    peeking_z = np.mean([r["fixed_horizon"].any() for r in runs])
    assert always_valid <= 0.05
    assert peeking_z > 0.10  # what the always-valid test protects against: a z-test read 20 times


def test_injected_lift_is_detected_about_as_often_as_predicted():
    result = simulate_tests(synthetic_behaviour(), runs=150, lift=0.2, reads=5, seed=3)
    assert result["aa_false_positive_rate"] <= 0.05 + 2 * result["aa_false_positive_rate_se"]
    assert 0.6 < result["predicted_power"] < 0.95  # planned from the pilot for power 0.8
    assert abs(result["observed_power"] - result["predicted_power"]) < 4 * result["observed_power_se"] + 0.05


def test_power_and_users_needed_agree():
    tau, alpha, effect, variance, users = 0.002, 0.05, 0.002, 4e-6, 1000
    needed = users_needed(effect, variance, users, tau, alpha, 0.8)
    assert msprt_power(effect, variance * users / needed, tau, alpha) >= 0.8
    assert msprt_power(effect, variance * users / (needed - 1), tau, alpha) < 0.8
    assert users_needed(0.0, variance, users, tau, alpha, 0.8) is None


def test_comparison_of_equal_arms_and_of_a_clear_lift():
    rng = np.random.default_rng(2)
    shown = np.full(5000, 10)
    a = RatioStats.of(rng.binomial(shown, 0.05), shown)
    same = compare(a, a)
    assert same.p_always_valid == 1.0 and not same.significant and same.lift == 0.0
    b = RatioStats.of(rng.binomial(shown, 0.065), shown)
    lifted = compare(a, b)
    assert lifted.significant and lifted.lift_ci[0] > 0 and lifted.difference_ci[0] > 0
    assert always_valid_p(lifted.difference, a.variance + b.variance, lifted.tau) == lifted.p_always_valid


def test_non_inferiority_needs_evidence_not_only_a_point_estimate():
    rng = np.random.default_rng(4)
    big = np.full(20_000, 10)
    stable = RatioStats.of(rng.binomial(big, 0.05), big)
    assert non_inferior(stable, RatioStats.of(rng.binomial(big, 0.05), big), max_drop=0.1)[0]
    assert not non_inferior(stable, RatioStats.of(rng.binomial(big, 0.035), big), max_drop=0.1)[0]
    few = np.full(30, 10)  # the same rate, but too little canary traffic to show it is not 10% worse
    assert not non_inferior(stable, RatioStats.of(rng.binomial(few, 0.05), few), max_drop=0.1)[0]


def test_wilson_interval():
    low, high = wilson(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-3) and high == pytest.approx(0.1744, abs=1e-3)
    assert wilson(0, 50)[0] == 0.0 and wilson(50, 50)[1] == 1.0  # the estimate itself is always inside


# ---- the event store ------------------------------------------------------------------------------------------
def impression(request, user="u1", arm="a", items=(1, 2, 3), **extra):
    return {"event_id": f"imp-{request}", "type": "impression", "request_id": request, "user_id": user,
            "experiment": "ab", "arm": arm, "items": list(items), **extra}


def action(kind, request, item, user="u1", suffix=""):
    return {"event_id": f"{kind}-{request}-{item}{suffix}", "type": kind, "request_id": request, "user_id": user,
            "item_id": item}


@pytest.fixture
def store(tmp_path):
    with EventStore(tmp_path / "events.sqlite", clock=lambda: 1_000_000.0) as s:
        s.register(AB)
        yield s


@pytest.mark.parametrize("event, reason", [
    ({"type": "view"}, "`type` must be one of"),
    ({**impression("r"), "items": []}, "items"),
    ({**impression("r"), "items": [1, 1]}, "repeat an item"),
    ({**impression("r"), "experiment": "nope"}, "not registered"),
    ({**impression("r"), "arm": "c"}, "has no arm 'c'"),
    ({**impression("r"), "ts": 1_000_000.0 + 2 * 86400}, "future"),
    ({**impression("r"), "colour": "red"}, "unknown fields"),
    ({k: v for k, v in action("click", "r", 1).items() if k != "item_id"}, "`item_id` is required"),
    ({**action("click", "r", 1), "value": 3.0}, "only a conversion"),
    ({**impression("r"), "arm": None}, "go together"),
])
def test_malformed_events_are_refused_whole_with_the_reason(store, event, reason):
    good = impression("fine")
    with pytest.raises(EventError, match=reason) as refused:
        store.append([good, event])
    assert refused.value.reasons[0].startswith("event 1")
    assert store.counts() == {}  # the good event in the same batch was not written either
    assert store.append([good]).accepted == 1


def test_duplicates_and_late_events_are_idempotent(store):
    assert store.append([action("click", "r1", 2)]).accepted == 1  # the click arrives before its impression
    assert store.append([impression("r1"), impression("r2", user="u2", arm="b")]).to_json() == \
        {"accepted": 2, "duplicates": 0}
    assert store.append([impression("r1"), action("click", "r1", 2)]).to_json() == {"accepted": 0, "duplicates": 2}
    store.append([action("click", "r1", 2, suffix="-again"), action("conversion", "r1", 2)])  # counted once
    store.append([action("click", "r2", 9, user="u2")])  # an item r2 never showed
    slots = store.slots("ab")
    assert len(slots) == 6 and slots.clicked.sum() == 1 and slots.converted.sum() == 1
    assert store.orphans() == 1
    report = reporting.build(store, "ab")
    assert report["arms"]["a"]["ctr"] == pytest.approx(1 / 3) and report["arms"]["b"]["clicks"] == 0
    assert report["arms"]["a"]["ctr_by_position"][1]["clicks"] == 1


def test_a_changed_definition_under_the_same_name_is_refused(store):
    store.register(AB)  # the same definition again: fine
    with pytest.raises(ExperimentError, match="another definition"):
        store.register(Experiment("ab", (Arm("a"), Arm("b", diversify=False))))


WRITER = """
import sys, time
from bert_recsys.client.experiments import Arm, EventStore, Experiment
store = EventStore(sys.argv[1])
store.register(Experiment("ab", (Arm("a"), Arm("b"))))
print("ready", flush=True)
batch = 0
while True:
    events = [{"event_id": f"imp-{batch}-{i}", "type": "impression", "request_id": f"{batch}-{i}", "user_id": i,
               "experiment": "ab", "arm": "ab"[i % 2], "items": list(range(i, i + 20))} for i in range(50)]
    events += [{"event_id": f"c-{batch}-{i}", "type": "click", "request_id": f"{batch}-{i}", "user_id": i,
                "item_id": i} for i in range(50)]
    store.append(events)
    batch += 1
"""


@pytest.mark.parametrize("after_s", [0.3, 0.8, 1.5])
def test_a_writer_killed_mid_batch_leaves_whole_batches_only(tmp_path, after_s):
    db = tmp_path / "events.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], cwd=settings.REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(after_s)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        events = raw.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        shown = raw.execute("SELECT COUNT(*) FROM shown").fetchone()[0]
        partial = raw.execute("SELECT COUNT(*) FROM events e WHERE e.type = 'impression' AND e.n_items != "
                              "(SELECT COUNT(*) FROM shown s WHERE s.request_id = e.request_id)").fetchone()[0]
    assert events > 0 and events % 100 == 0, "a batch was half written"
    assert shown == 20 * events // 2 and partial == 0
    with EventStore(db) as reopened:  # and the store opens and appends again
        assert reopened.append([impression("after")]).accepted == 1


# ---- the report --------------------------------------------------------------------------------------------
def test_report_of_a_replayed_experiment_has_every_part(tmp_path):
    behaviour = synthetic_behaviour()
    experiment = Experiment("abn", (Arm("a"), Arm("b"), Arm("c")), catalog_size=700)
    with EventStore(tmp_path / "e.sqlite") as store:
        written = replay_into_store(store, experiment, {"a": behaviour, "b": behaviour, "c": behaviour}, 3000,
                                    versions={"a": 1, "b": 1, "c": 2})
        report = reporting.build(store, "abn", categories={i: "odd" if i % 2 else "even" for i in range(700)})
        by_version = store.slots(since=0.0)
    assert written == sum(report["events"].values())
    assert sum(a["impressions"] for a in report["arms"].values()) == 3000
    assert set(np.unique(by_version.encoder_version)) == {1, 2}
    a = report["arms"]["a"]
    assert 0 < a["ctr"] < 0.2 and a["ctr_ci95"][0] < a["ctr"] < a["ctr_ci95"][1] and a["coverage"] <= 1
    assert set(a["category_mix"]) == {"odd", "even"} and len(a["ctr_by_position"]) == 10
    assert set(report["comparisons"]) == {"b", "c"} and report["sequential"]["b"]
    md, js = reporting.write(report, tmp_path / "out")
    text = md.read_text()
    assert "| b | ctr |" in text and "abn-positions.png" in text and (tmp_path / "out" / "abn-sequential.png").exists()
    assert json.loads(js.read_text())["arms"]["c"]["users"] == report["arms"]["c"]["users"]
