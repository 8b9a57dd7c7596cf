"""Offline experiments with real behaviour: held-out MovieLens positives replayed as clicks.

Each simulated visitor is a MovieLens user drawn at random (so traffic can be larger than the 610 users); the
arm is assigned from the visitor's id exactly as in serving; the visitor sees that arm's real list (the
recommender through Triton, fitted on the history part only) and clicks a shown item only if it is among the
user's future positives (held-out ratings >= 4), with position bias: the item at position k (0-based) is
examined with probability `top_examination / (k + 1) ** decay`. A click converts with probability
(rating - 3.5) / 1.5: a 5-star future rating always converts, a 4-star one a third of the time.

Three simulations:
- A/A: two arms with the same lists, many runs, the test read at `reads` moments of each run; the false-positive
  rate of the always-valid test against alpha, and of a fixed-horizon z-test read as often, for contrast.
- injected lift: arm B's click probabilities x (1 + lift); the report's predicted power at the planned sample
  size (from a pilot run, as a user would plan) against the observed rate of detection.
- real arms: an A/B/n of recommender settings, written through the event store and reported like a live one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from bert_recsys import logs
from bert_recsys.client.experiments.design import Arm, Experiment, bucket
from bert_recsys.client.experiments.events import EventStore
from bert_recsys.client.experiments.serving import ExperimentRecommender
from bert_recsys.client.experiments.stats import mixture_tau, msprt_log_lambda, msprt_power, users_needed, vectorised_ratio

log = logs.get("client")


@dataclass(frozen=True)
class ClickModel:
    top_examination: float = 0.8
    decay: float = 0.8

    def examination(self, n: int) -> np.ndarray:
        return self.top_examination / (np.arange(n) + 1.0) ** self.decay

    @staticmethod
    def conversion(rating: float) -> float:
        return float(np.clip((rating - 3.5) / 1.5, 0.0, 1.0))


@dataclass(frozen=True)
class Behaviour:
    """What each real user would do with one arm's list: click and conversion probability per position."""

    users: np.ndarray       # (U,) MovieLens user ids
    items: np.ndarray       # (U, n) item shown at each position, -1 past the list's end
    click_p: np.ndarray     # (U, n)
    convert_p: np.ndarray   # (U, n) given a click
    shown: np.ndarray       # (U,) list length

    @classmethod
    def of(cls, lists: dict[int, list[int]], future: dict[int, dict[int, float]], model: ClickModel, n: int):
        users = np.array(sorted(lists), dtype=np.int64)
        items = np.full((len(users), n), -1, dtype=np.int64)
        click_p = np.zeros((len(users), n))
        convert_p = np.zeros((len(users), n))
        examined = model.examination(n)
        for row, user in enumerate(users):
            ranked = lists[int(user)][:n]
            items[row, : len(ranked)] = ranked
            for k, item in enumerate(ranked):
                rating = future.get(int(user), {}).get(int(item))
                if rating is not None:
                    click_p[row, k] = examined[k]
                    convert_p[row, k] = model.conversion(rating)
        return cls(users, items, click_p, convert_p, (items >= 0).sum(axis=1))


def real_lists(recommender, arm: Arm, users, n: int = 10) -> dict[int, list[int]]:
    """The arm's real list for each user (the recommender, through Triton)."""
    served = ExperimentRecommender(recommender, None)
    lists = {}
    started = time.perf_counter()
    for i, user in enumerate(users):
        _, items, _ = served.recommend_arm(arm, int(user), n=n)
        lists[int(user)] = [r["item_id"] for r in items]
        if (i + 1) % 200 == 0:
            log.info("arm %s: lists for %d/%d users (%.1f s)", arm.name, i + 1, len(users), time.perf_counter() - started)
    return lists


# ---- many runs of two arms, as arrays ------------------------------------------------------------------------
def run_once(behaviour: Behaviour, visitors: int, salt: str, lift: float, rng: np.random.Generator,
             reads: int, mde: float, alpha: float) -> dict:
    """One simulated experiment of two equal arms on the same lists (arm 1's clicks x (1 + lift)), with the CTR
    test read at `reads` evenly spaced moments. -> per-read arrays of both tests' verdicts and the last read's
    difference and variance."""
    rows = rng.integers(len(behaviour.users), size=visitors)
    arm = np.fromiter((bucket(salt, f"visitor-{i}", (1.0, 1.0)) for i in range(visitors)), dtype=np.int64,
                      count=visitors)
    p = behaviour.click_p[rows] * np.where(arm == 1, 1.0 + lift, 1.0)[:, None]
    clicks = (rng.random(p.shape) < p).sum(axis=1).astype(np.float64)
    shown = behaviour.shown[rows].astype(np.float64)
    at = np.linspace(visitors / reads, visitors, reads).astype(np.int64) - 1
    sums = []
    for a in (0, 1):
        mask = (arm == a).astype(np.float64)
        x, y = clicks * mask, shown * mask
        sums.append([np.cumsum(v)[at] for v in (mask, x, y, x * x, y * y, x * y)])
    (r0, v0), (r1, v1) = vectorised_ratio(*sums[0]), vectorised_ratio(*sums[1])
    diff, variance = r1 - r0, v0 + v1
    tau = np.maximum(r0 * mde, 1e-9)
    log_lambda = msprt_log_lambda(diff, variance, tau)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(variance > 0, np.abs(diff) / np.sqrt(variance), 0.0)
    z_crit = NormalDist().inv_cdf(1 - alpha / 2)
    return {"always_valid": log_lambda >= np.log(1 / alpha), "fixed_horizon": z >= z_crit,
            "diff": float(diff[-1]), "variance": float(variance[-1]), "control_ctr": float(r0[-1]),
            "users": int(sums[0][0][-1] + sums[1][0][-1])}


def plan_visitors(behaviour: Behaviour, mde: float, alpha: float, power: float, rng, pilot: int = 10_000,
                  cap: int = 200_000, visitors: int | None = None) -> tuple[int, float, dict]:
    """As a user would: a pilot A/A run, then the report's users-needed for `mde` -> visitors (both arms, unless
    `visitors` is given), and the power the report predicts there."""
    pilot_run = run_once(behaviour, pilot, "pilot", 0.0, rng, 1, mde, alpha)
    tau = mixture_tau(pilot_run["control_ctr"], mde)
    effect = pilot_run["control_ctr"] * mde
    per_arm = pilot / 2
    needed = users_needed(effect, pilot_run["variance"], int(per_arm), tau, alpha, power, limit=cap // 2)
    visitors = visitors or (2 * needed if needed is not None else cap)
    predicted = msprt_power(effect, pilot_run["variance"] * per_arm / (visitors / 2), tau, alpha)
    return visitors, predicted, {"pilot_visitors": pilot, "pilot_ctr": pilot_run["control_ctr"],
                                 "users_needed_per_arm": needed}


def simulate_tests(behaviour: Behaviour, runs: int, lift: float, alpha: float = 0.05, power: float = 0.8,
                   reads: int = 20, seed: int = 0, visitors: int | None = None) -> dict:
    """A/A false-positive rates and injected-lift power, over `runs` runs each."""
    rng = np.random.default_rng(seed)
    planned, predicted, pilot = plan_visitors(behaviour, lift, alpha, power, rng, visitors=visitors)
    visitors = visitors or planned
    log.info("simulating %d A/A and %d lift runs of %d visitors, %d reads each", runs, runs, visitors, reads)
    started = time.perf_counter()
    aa, ab = [], []
    for r in range(runs):
        aa.append(run_once(behaviour, visitors, f"aa-{seed}-{r}", 0.0, rng, reads, lift, alpha))
        ab.append(run_once(behaviour, visitors, f"ab-{seed}-{r}", lift, rng, reads, lift, alpha))
        if (r + 1) % max(1, runs // 10) == 0:
            log.info("  %d/%d runs (%.0f s)", r + 1, runs, time.perf_counter() - started)

    def rate(results, key, final_only):
        return float(np.mean([res[key][-1] if final_only else res[key].any() for res in results]))

    return {
        "alpha": alpha, "runs": runs, "visitors_per_run": visitors, "reads_per_run": reads, "injected_lift": lift,
        "aa_false_positive_rate": rate(aa, "always_valid", final_only=False),
        "aa_false_positive_rate_final_read": rate(aa, "always_valid", final_only=True),
        "aa_fixed_horizon_z_false_positive_rate_read_every_time": rate(aa, "fixed_horizon", final_only=False),
        "aa_fixed_horizon_z_false_positive_rate_final_read": rate(aa, "fixed_horizon", final_only=True),
        "predicted_power": predicted,
        "observed_power": rate(ab, "always_valid", final_only=True),
        "observed_power_any_read": rate(ab, "always_valid", final_only=False),
        "observed_power_se": float(np.sqrt(max(rate(ab, "always_valid", True) * (1 - rate(ab, "always_valid", True)), 1e-12) / runs)),
        "aa_false_positive_rate_se": float(np.sqrt(alpha * (1 - alpha) / runs)),
        "plan": pilot, "mean_ctr": float(np.mean([res["control_ctr"] for res in aa])),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---- real arms through the event store -----------------------------------------------------------------------
def replay_into_store(store: EventStore, experiment: Experiment, behaviours: dict[str, Behaviour], visitors: int,
                      seed: int = 0, start_ts: float | None = None, versions: dict[str, int] | None = None,
                      batch: int = 2000) -> int:
    """`visitors` visits: assignment as served, the arm's real list shown (an impression), clicks and conversions
    drawn from the behaviour; appended to the store in batches. -> events written."""
    rng = np.random.default_rng(seed)
    store.register(experiment)
    ts = start_ts or time.time() - visitors
    pending, written = [], 0
    users = next(iter(behaviours.values())).users
    for v in range(visitors):
        visitor = f"{experiment.name}-visitor-{v}"
        arm = experiment.assign(visitor)
        b = behaviours[arm.name]
        row = int(rng.integers(len(users)))
        request = f"{experiment.name}-{v}"
        items = [int(i) for i in b.items[row, : b.shown[row]]]
        if not items:
            continue
        pending.append({"event_id": f"imp-{request}", "type": "impression", "request_id": request, "user_id": visitor,
                        "experiment": experiment.name, "arm": arm.name, "items": items, "ts": ts + v,
                        **({"encoder_version": versions[arm.name]} if versions else {})})
        clicked = rng.random(len(items)) < b.click_p[row, : len(items)]
        converted = clicked & (rng.random(len(items)) < b.convert_p[row, : len(items)])
        for k in np.flatnonzero(clicked):
            pending.append({"event_id": f"click-{request}-{k}", "type": "click", "request_id": request,
                            "user_id": visitor, "item_id": items[k], "position": int(k), "ts": ts + v + 1})
        for k in np.flatnonzero(converted):
            pending.append({"event_id": f"conv-{request}-{k}", "type": "conversion", "request_id": request,
                            "user_id": visitor, "item_id": items[k], "ts": ts + v + 2})
        if len(pending) >= batch:
            written += store.append(pending).accepted
            pending = []
    if pending:
        written += store.append(pending).accepted
    return written


__all__ = ["ClickModel", "Behaviour", "real_lists", "run_once", "plan_visitors", "simulate_tests", "replay_into_store"]
