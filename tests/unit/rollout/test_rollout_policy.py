"""The rollout's decisions, on metric snapshots recorded from a real tritonserver (no server here).

tests/fixtures/metrics/{before,after}.txt are two /metrics reads of Triton 2.51 serving a staged repository
(stable v1 = onnx-int8, canary v2 = onnx-fp32) around known traffic: 40 `embed` calls and 4 refused ones
(text over the limit), 6 `score` calls, 12 `embed_v2` and 3 `score_v2` calls.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bert_recsys import settings
from bert_recsys.rollout.admin import parse_metrics
from bert_recsys.rollout.policy import (CanaryVerdict, RolloutSettings, Traffic, Validation, canary_verdict, role, shares, traffic,
                            validation_failures)

M = settings.SETTINGS.models
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "metrics"


@pytest.fixture(scope="module")
def snapshots():
    return parse_metrics((FIXTURES / "before.txt").read_text()), parse_metrics((FIXTURES / "after.txt").read_text())


def test_the_parser_reads_tritons_counters_per_model_summed_over_labels(snapshots):
    before, after = snapshots
    assert after[("nv_inference_request_success", "embed")] == 41
    assert after[("nv_inference_request_success", "embed_v2")] == 13
    # failures carry a `reason` label; the parser sums over it
    assert after[("nv_inference_request_failure", "embed")] == 8
    assert after[("nv_inference_request_failure", "embed_v2")] == 0
    assert before[("nv_inference_request_success", "embed")] == 1
    # only the three counters the rollout uses are kept
    assert {name for name, _ in after} == {"nv_inference_request_success", "nv_inference_request_failure",
                                           "nv_inference_request_duration_us"}


def test_traffic_between_the_two_reads(snapshots):
    stable = traffic(*snapshots, M.ensembles)
    canary = traffic(*snapshots, M.pinned_ensembles(2))
    assert (stable.requests, stable.failures) == (40 + 8 + 6, 8)
    assert (canary.requests, canary.failures) == (15, 0)
    assert stable.failure_rate == pytest.approx(8 / 54) and canary.failure_rate == 0.0
    assert 0 < canary.mean_ms < 10_000 and 0 < stable.mean_ms < 10_000


def test_a_canary_with_enough_clean_traffic_is_healthy(snapshots):
    stable = traffic(*snapshots, M.ensembles)
    canary = traffic(*snapshots, M.pinned_ensembles(2))
    loose = RolloutSettings(canary_min_requests=10, canary_max_latency_ratio=1000.0)
    verdict = canary_verdict(stable, canary, loose)
    assert verdict.healthy and verdict.reasons == ()
    assert verdict.to_json()["canary"]["requests"] == 15


def test_each_unhealthy_figure_is_named(snapshots):
    stable = traffic(*snapshots, M.ensembles)
    canary = traffic(*snapshots, M.pinned_ensembles(2))
    too_few = canary_verdict(stable, canary, RolloutSettings(canary_min_requests=50, canary_max_latency_ratio=1000.0))
    assert not too_few.healthy and too_few.reasons[0].startswith("only 15 canary requests (need 50)")
    # The same windows with roles swapped: the failing group as the canary.
    failing = canary_verdict(canary, stable, RolloutSettings(canary_min_requests=10, canary_max_latency_ratio=1000.0))
    assert [r.split()[0:2] for r in failing.reasons] == [["failure", "rate"]]
    slow = canary_verdict(Traffic(("embed",), 100, 0, 0.0, 5.0), Traffic(("embed_v2",), 100, 0, 0.0, 12.0),
                          RolloutSettings())
    assert slow.reasons == ("mean latency 12.00 ms vs stable 5.00 ms",)
    # Below the slack, a ratio alone is noise: 1.5 ms vs 0.5 ms is 3x but under 2 ms apart.
    assert canary_verdict(Traffic((), 100, 0, 0.0, 0.5), Traffic((), 100, 0, 0.0, 1.5), RolloutSettings()).healthy


def test_a_canary_that_cannot_embed_the_catalog_index_is_unhealthy_whatever_its_traffic():
    from bert_recsys.rollout.policy import index_failure

    clean = Traffic(("embed_v2",), 500, 0, 0.0, 5.0)
    verdict = index_failure(Traffic(("embed",), 500, 0, 0.0, 5.0), clean, "infer embed_v2: INTERNAL: boom")
    assert not verdict.healthy
    assert verdict.to_json()["reasons"] == ["the canary could not embed the catalog index: infer embed_v2: INTERNAL: boom"]
    assert verdict.to_json()["canary"]["requests"] == 500


def test_validation_failures_quote_the_figures():
    good = Validation(0.9995, 0.998, 41, p50_ms_stable=4.0, p50_ms_new=5.0)
    assert validation_failures(good, 1, RolloutSettings()) == []
    bad = Validation(0.95, 0.40, 41, p50_ms_stable=4.0, p50_ms_new=7.0)
    reasons = validation_failures(bad, 3, RolloutSettings())
    assert reasons[0].startswith("parity with version 3: mean cosine 0.9500 (need 0.99), min 0.4000")
    assert reasons[1] == "latency: p50 7.00 ms > 1.5 x 4.00 ms of version 3"


def test_roles_shares_and_settings_validation():
    assert [role(v, stable=2, canary=3) for v in (1, 2, 3)] == ["retiring", "stable", "canary"]
    assert shares({1: 30, 2: 10}) == {1: 0.75, 2: 0.25} and shares({1: 0}) == {1: 0.0}
    with pytest.raises(ValueError, match="unknown runtime"):
        RolloutSettings(runtime="tensorflow")
    with pytest.raises(ValueError, match="cosine"):
        RolloutSettings(parity_min_cosine=1.5)
    assert isinstance(canary_verdict(Traffic((), 0, 0, 0, 0), Traffic((), 0, 0, 0, 0), RolloutSettings()), CanaryVerdict)


# ---- conversion of the canary's lists (client/experiments events) -------------------------------------------------
def responses(version, users, shown_per_user, rate, seed):
    import numpy as np

    from bert_recsys.client.experiments.stats import RatioStats
    from bert_recsys.rollout.policy import Responses

    shown = np.full(users, shown_per_user)
    return Responses(version, RatioStats.of(np.random.default_rng(seed).binomial(shown, rate), shown))


def test_the_canary_must_show_its_conversion_is_not_worse_than_stables():
    healthy = Traffic(("embed_v2",), 500, 0, 0.0, 5.0)
    rollout = RolloutSettings(canary_min_requests=10, canary_max_conversion_drop=0.10, canary_min_impressions=1000)
    stable = responses(1, 20_000, 10, 0.05, 1)
    same = canary_verdict(healthy, healthy, rollout, (stable, responses(2, 20_000, 10, 0.05, 2)))
    assert same.healthy and same.to_json()["responses"]["canary"]["shown"] == 200_000
    worse = canary_verdict(healthy, healthy, rollout, (stable, responses(2, 20_000, 10, 0.035, 3)))
    assert not worse.healthy and worse.reasons[0].startswith("conversion_rate 0.03")
    assert "below -10.0%" in worse.reasons[0]
    thin = canary_verdict(healthy, healthy, rollout, (stable, responses(2, 50, 10, 0.05, 4)))
    assert not thin.healthy and "only 500 items shown" in thin.reasons[0]
    with pytest.raises(ValueError, match="needs both versions' responses"):
        canary_verdict(healthy, healthy, rollout)
    assert canary_verdict(healthy, healthy, RolloutSettings(canary_min_requests=10)).responses is None  # not asked


@pytest.mark.parametrize("bad", [dict(canary_max_conversion_drop=1.5), dict(canary_conversion_metric="revenue"),
                                 dict(canary_conversion_alpha=0.9), dict(canary_min_impressions=0)])
def test_conversion_settings_are_validated(bad):
    with pytest.raises(ValueError):
        RolloutSettings(**bad)


def test_the_outcome_is_an_enum_that_serializes_as_its_name():
    import json

    from bert_recsys.rollout.policy import Outcome, Phase

    assert Outcome.of(True) is Outcome.PROMOTED and Outcome.of(False) is Outcome.ROLLED_BACK
    assert json.dumps({"outcome": Outcome.ROLLED_BACK, "phases": [(Phase.CANARY, 1.5)]}) == \
        '{"outcome": "rolled_back", "phases": [["canary", 1.5]]}'
