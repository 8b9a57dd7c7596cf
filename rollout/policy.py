"""The rollout's decisions: pure functions of figures already measured, with no server, file or clock.

The steps (rollout/steps.py) measure; these decide. Each verdict lists its reasons, empty when it passes,
so a refused promotion says which figure failed and by how much.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

from bert_recsys.client.experiments.design import METRICS
from bert_recsys.client.experiments.stats import RatioStats, non_inferior
from bert_recsys.contracts.runtime import Runtime

# {(metric name, model name): value}, summed over replicas, versions and label values (rollout/admin.py).
MetricSnapshot = dict[tuple[str, str], float]


class RolloutRefused(RuntimeError):
    """The new version failed a check before it took any traffic; what was serving is untouched."""


class Outcome(StrEnum):
    """How a rollout that went live ended (one refused before going live raises RolloutRefused instead)."""

    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"

    @classmethod
    def of(cls, canary_healthy: bool) -> "Outcome":
        return cls.PROMOTED if canary_healthy else cls.ROLLED_BACK


class Phase(StrEnum):
    """The phases of a rollout, in order, as its report's `phases` records them with their start times."""

    VALIDATE = "validate"   # staged; the validation server compares the new version with the stable one
    INDEX = "index"         # live; the canary embeds the catalog index its share of recommendations is served from
    CANARY = "canary"       # live beside the stable version, taking its share
    PROMOTE = "promote"     # the public ensembles switch; the old version drains
    ROLL_BACK = "roll_back"  # the canary goes
    DONE = "done"


@dataclass(frozen=True)
class RolloutSettings:
    # Validation, on a separate server, before any traffic:
    parity_min_mean_cosine: float = 0.99   # new vs stable version on the golden set (lower it for a retrained model)
    parity_min_cosine: float = 0.95        # ... and for the worst golden sentence
    latency_max_ratio: float = 1.5         # new p50 / stable p50, batch 1, measured interleaved on that server
    latency_samples: int = 40
    # Canary, on the live server, from Triton's metrics:
    canary_seconds: float = 60.0
    canary_min_requests: int = 50          # fewer than this on the canary: not enough evidence, roll back
    canary_max_failure_rate: float = 0.001  # above the stable failure rate by more than this: roll back
    canary_max_latency_ratio: float = 1.5  # canary mean latency / stable mean latency
    canary_latency_slack_ms: float = 2.0   # ... ignoring differences below this (noise at low latency)
    drain_seconds: float = 5.0             # after the switch, before the old version's ensembles go
    # Canary, from the experiment event store (client/experiments): users' responses to the lists each version
    # produced during the canary window. None: not checked. 0.05: the canary's conversion rate must be shown
    # (one-sided, at 1 - canary_conversion_alpha) to be at least 95% of the stable version's.
    canary_max_conversion_drop: float | None = None
    canary_conversion_metric: str = "conversion_rate"   # or "ctr"
    canary_conversion_alpha: float = 0.05
    canary_min_impressions: int = 500      # items shown from the canary's lists before they can be judged
    # The encoder runtime of the new version; "" = the one the live repository already runs.
    runtime: str = ""

    def __post_init__(self):
        if self.runtime:
            Runtime.parse(self.runtime)
        for name in ("parity_min_mean_cosine", "parity_min_cosine"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a cosine within [-1, 1], not {getattr(self, name)}")
        if self.latency_max_ratio <= 0 or self.canary_max_latency_ratio <= 0:
            raise ValueError("latency ratios must be positive")
        if self.latency_samples < 2 or self.canary_min_requests < 0 or self.canary_seconds < 0 or self.drain_seconds < 0:
            raise ValueError("sample counts and durations must not be negative (latency_samples >= 2)")
        if self.canary_max_conversion_drop is not None and not 0 <= self.canary_max_conversion_drop < 1:
            raise ValueError("canary_max_conversion_drop is a relative drop within [0, 1)")
        if self.canary_conversion_metric not in METRICS:
            raise ValueError(f"canary_conversion_metric must be one of {METRICS}")
        if not 0 < self.canary_conversion_alpha < 0.5 or self.canary_min_impressions < 1:
            raise ValueError("canary_conversion_alpha must be within (0, 0.5) and canary_min_impressions >= 1")

    @property
    def checks_conversion(self) -> bool:
        return self.canary_max_conversion_drop is not None


# ---- traffic between two metric reads -------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """Requests, failures and mean latency of a group of models between two metric reads."""

    models: tuple[str, ...]
    requests: int
    failures: int
    failure_rate: float
    mean_ms: float

    def to_json(self) -> dict:
        return {**asdict(self), "models": list(self.models)}


def traffic(before: MetricSnapshot, after: MetricSnapshot, models: list[str] | tuple[str, ...]) -> Traffic:
    def delta(metric):
        return sum(after.get((metric, m), 0.0) - before.get((metric, m), 0.0) for m in models)

    success, failure = delta("nv_inference_request_success"), delta("nv_inference_request_failure")
    total = success + failure
    return Traffic(tuple(models), int(total), int(failure), failure / total if total else 0.0,
                   delta("nv_inference_request_duration_us") / total / 1000 if total else 0.0)


# ---- validation: parity and latency on a separate server --------------------------------------------------
@dataclass(frozen=True)
class Validation:
    parity_mean_cosine: float
    parity_min_cosine: float
    golden_texts: int
    p50_ms_stable: float
    p50_ms_new: float

    def to_json(self) -> dict:
        return asdict(self)


def validation_failures(v: Validation, stable: int, rollout: RolloutSettings) -> list[str]:
    reasons = []
    if v.parity_mean_cosine < rollout.parity_min_mean_cosine or v.parity_min_cosine < rollout.parity_min_cosine:
        reasons.append(f"parity with version {stable}: mean cosine {v.parity_mean_cosine:.4f} "
                       f"(need {rollout.parity_min_mean_cosine}), min {v.parity_min_cosine:.4f} "
                       f"(need {rollout.parity_min_cosine})")
    if v.p50_ms_new > rollout.latency_max_ratio * v.p50_ms_stable:
        reasons.append(f"latency: p50 {v.p50_ms_new:.2f} ms > {rollout.latency_max_ratio} x "
                       f"{v.p50_ms_stable:.2f} ms of version {stable}")
    return reasons


# ---- the canary: its traffic against the stable version's -------------------------------------------------
@dataclass(frozen=True)
class Responses:
    """What users did with the lists of one encoder version: per-user sums of the metric over shown items."""

    version: int
    stats: RatioStats

    def to_json(self) -> dict:
        return {"version": self.version, "users": self.stats.n, "shown": int(self.stats.sy),
                "actions": int(self.stats.sx), "rate": self.stats.ratio}


def conversion_failures(stable: Responses, canary: Responses, rollout: RolloutSettings) -> list[str]:
    """Non-inferiority of the canary's conversion (or CTR) against the stable version's, on the canary window's
    events; too few shown items on the canary is a failure too (no evidence, as with too few requests)."""
    metric, drop = rollout.canary_conversion_metric, rollout.canary_max_conversion_drop
    shown = int(canary.stats.sy)
    if shown < rollout.canary_min_impressions:
        return [f"{metric}: only {shown} items shown from canary v{canary.version}'s lists (need "
                f"{rollout.canary_min_impressions}): are impressions with its encoder_version being recorded?"]
    passes, lower = non_inferior(stable.stats, canary.stats, drop, rollout.canary_conversion_alpha)
    if passes:
        return []
    return [f"{metric} {canary.stats.ratio:.4f} vs stable {stable.stats.ratio:.4f}: lift lower bound "
            f"{lower:+.1%} at {1 - rollout.canary_conversion_alpha:.0%} is below -{drop:.1%}"]


@dataclass(frozen=True)
class CanaryVerdict:
    stable: Traffic
    canary: Traffic
    reasons: tuple[str, ...] = field(default=())
    responses: tuple[Responses, Responses] | None = None   # (stable, canary), when conversion is checked

    @property
    def healthy(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict:
        out = {"stable": self.stable.to_json(), "canary": self.canary.to_json(), "healthy": self.healthy,
               "reasons": list(self.reasons)}
        if self.responses is not None:
            out["responses"] = {"stable": self.responses[0].to_json(), "canary": self.responses[1].to_json()}
        return out


def canary_verdict(stable: Traffic, canary: Traffic, rollout: RolloutSettings,
                   responses: tuple[Responses, Responses] | None = None) -> CanaryVerdict:
    reasons = []
    if canary.requests < rollout.canary_min_requests:
        reasons.append(f"only {canary.requests} canary requests (need {rollout.canary_min_requests}): "
                       "are clients sending a canary share?")
    if canary.failure_rate > stable.failure_rate + rollout.canary_max_failure_rate:
        reasons.append(f"failure rate {canary.failure_rate:.4f} vs stable {stable.failure_rate:.4f}")
    if stable.requests and canary.mean_ms > max(rollout.canary_max_latency_ratio * stable.mean_ms,
                                                stable.mean_ms + rollout.canary_latency_slack_ms):
        reasons.append(f"mean latency {canary.mean_ms:.2f} ms vs stable {stable.mean_ms:.2f} ms")
    if rollout.checks_conversion:
        if responses is None:
            raise ValueError("the rollout checks conversion: the canary verdict needs both versions' responses")
        reasons += conversion_failures(*responses, rollout)
    return CanaryVerdict(stable, canary, tuple(reasons), responses)


def index_failure(stable: Traffic, canary: Traffic, error: str) -> CanaryVerdict:
    """The verdict on a canary that could not embed the catalog index (before its window): unhealthy, whatever
    its traffic, since its share of recommendations would have no index to be served from."""
    return CanaryVerdict(stable, canary, (f"the canary could not embed the catalog index: {error}",))


# ---- roles and shares, for `status` ----------------------------------------------------------------------
def role(version: int, stable: int, canary: int | None) -> str:
    return "stable" if version == stable else "canary" if version == canary else "retiring"


def shares(counts: dict[int, int]) -> dict[int, float]:
    total = sum(counts.values())
    return {version: round(count / total, 4) if total else 0.0 for version, count in counts.items()}
