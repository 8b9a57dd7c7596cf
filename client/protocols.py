"""Evaluation protocols: which interactions a system may learn from, and what it is then asked to rank.

    warm         per user, the last 20% of interactions by time are the test part (`time_split`)
    item cold    (primary for text) a random 20% of the catalog is hidden: every interaction with a hidden item is
                 removed from training, so hidden items have no co-occurrence and no popularity. Test users have
                 >= 5 positives on visible items and >= 1 on a hidden item; each ranks the hidden items.
    temporal     (secondary) one global cutoff in time; after it, positives on cold items (no interaction before
                 the cutoff), on warm items, and those of cold users (no interaction before it) are scored apart.

Settings are chosen on a validation split carved from the training part (`validation_split`: the same hold-out
again, over visible items only), never on the reported test split. Everything here is pure numpy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bert_recsys.client.catalog import Interactions

POSITIVE = 4.0
SMALL_SEGMENT = 100  # fewer users than this: the figure is printed with a warning
TEST_FRACTION = 0.2
TEMPORAL_QUANTILE = 0.8


# ---- warm: per user, by time ------------------------------------------------------------------------------
def test_mask(data: Interactions, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Per user (interactions sorted by user, then time): True for the last `test_fraction` (at least one)."""
    is_test = np.zeros(len(data), dtype=bool)
    starts = np.flatnonzero(np.r_[True, data.user[1:] != data.user[:-1]])
    ends = np.r_[starts[1:], len(data)]
    for a, b in zip(starts, ends):
        n_test = max(1, int(round((b - a) * test_fraction)))
        if b - a > n_test:  # users with a single interaction stay in history only
            is_test[b - n_test : b] = True
    return is_test


def time_split(data: Interactions, test_fraction: float = TEST_FRACTION, positive: float = POSITIVE):
    """-> (history interactions, {user: set of test positive items})."""
    history, future = future_ratings(data, test_fraction, positive)
    return history, {user: set(ratings) for user, ratings in future.items()}


def future_ratings(data: Interactions, test_fraction: float = TEST_FRACTION, positive: float = POSITIVE):
    """-> (history interactions, {user: {test positive item: its rating}}): what the simulator replays."""
    is_test = test_mask(data, test_fraction)
    test = data.take(is_test)
    future: dict[int, dict[int, float]] = {}
    for user, item, rating in zip(test.user, test.item, test.rating):
        if rating >= positive:
            future.setdefault(int(user), {})[int(item)] = float(rating)
    return data.take(~is_test), future


# ---- which part of the data a model may learn from --------------------------------------------------------
SPLITS = ("all", "warm", "temporal", "cold:<seed>")


def parse_split(name: str) -> str:
    """A split identifier: all, warm, temporal or cold:<seed>. What a fine-tuned encoder was trained without is
    recorded under this name, and the evaluation only uses an encoder for the split it was trained for."""
    if name in ("all", "warm", "temporal"):
        return name
    if name.startswith("cold:") and name[5:].isdigit():
        return f"cold:{int(name[5:])}"
    raise ValueError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")


def training_part(split: str, item_ids: np.ndarray, data: Interactions) -> tuple[Interactions, np.ndarray]:
    """-> (what a model evaluated on `split` may learn from, the items it must not have seen interactions of)."""
    split = parse_split(split)
    if split == "all":
        return data, np.zeros(0, dtype=np.int64)
    if split == "warm":
        return time_split(data)[0], np.zeros(0, dtype=np.int64)
    if split == "temporal":
        cut = temporal_split(data)
        return cut.train, cut.cold_item_ids
    held = item_holdout(item_ids, data, ItemHoldout(seed=int(split[5:])))
    return held.train, held.hidden


@dataclass(frozen=True)
class ItemHoldout:
    seed: int = 0
    fraction: float = 0.2
    positive: float = POSITIVE
    min_visible_positives: int = 5

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"hold-out fraction must be within (0, 1), not {self.fraction}")
        if self.min_visible_positives < 1:
            raise ValueError("test users need at least one visible positive")


@dataclass
class HoldoutSplit:
    """`train` holds no interaction with a hidden item; `truth[user]` is the user's positives among them."""

    spec: ItemHoldout
    hidden: np.ndarray                  # item ids, sorted
    train: Interactions
    truth: dict[int, set[int]]
    validation_of: int | None = None    # the seed of the split this one was carved from

    @property
    def users(self) -> list[int]:
        return sorted(self.truth)

    def describe(self) -> dict:
        return {"protocol": "item cold start", "seed": self.spec.seed, "hidden_fraction": self.spec.fraction,
                "hidden_items": int(len(self.hidden)), "train_interactions": int(len(self.train)),
                "test_users": len(self.truth), "positive_rating": self.spec.positive,
                "min_visible_positives": self.spec.min_visible_positives,
                **({"validation_of_seed": self.validation_of} if self.validation_of is not None else {})}


def item_holdout(item_ids: np.ndarray, data: Interactions, spec: ItemHoldout = ItemHoldout()) -> HoldoutSplit:
    """Hides round(fraction x catalog) items chosen with `spec.seed`; see the module's doc."""
    item_ids = np.unique(np.asarray(item_ids, dtype=np.int64))
    rng = np.random.default_rng(spec.seed)
    hidden = np.sort(rng.choice(item_ids, int(round(spec.fraction * len(item_ids))), replace=False))
    on_hidden = np.isin(data.item, hidden)
    train = data.take(~on_hidden)
    positive = data.rating >= spec.positive
    users, n_visible = np.unique(data.user[positive & ~on_hidden], return_counts=True)
    counts = dict(zip(users.tolist(), n_visible.tolist()))
    truth: dict[int, set[int]] = {}
    for user, item in zip(data.user[positive & on_hidden].tolist(), data.item[positive & on_hidden].tolist()):
        if counts.get(user, 0) >= spec.min_visible_positives:
            truth.setdefault(user, set()).add(item)
    return HoldoutSplit(spec, hidden, train, truth)


def validation_split(split: HoldoutSplit, item_ids: np.ndarray) -> HoldoutSplit:
    """The same protocol again inside `split.train`, over the visible items only (seed 1000 + the split's): what
    every setting is chosen on. Its hidden items are visible ones, so nothing of the test split is looked at."""
    visible = np.setdiff1d(np.asarray(item_ids, dtype=np.int64), split.hidden)
    spec = ItemHoldout(1000 + split.spec.seed, split.spec.fraction, split.spec.positive, split.spec.min_visible_positives)
    inner = item_holdout(visible, split.train, spec)
    inner.validation_of = split.spec.seed
    return inner


# ---- temporal --------------------------------------------------------------------------------------------
@dataclass
class TemporalSplit:
    cutoff: int
    train: Interactions
    cold_items: dict[int, set[int]] = field(default_factory=dict)   # warm user -> positives on cold items
    warm_items: dict[int, set[int]] = field(default_factory=dict)   # warm user -> positives on warm items
    cold_users: dict[int, set[int]] = field(default_factory=dict)   # cold user -> every positive after the cutoff
    cold_item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def populations(self) -> dict[str, int]:
        return {"cold_items": len(self.cold_items), "warm_items": len(self.warm_items), "cold_users": len(self.cold_users)}

    def warnings(self) -> list[str]:
        return [f"temporal segment {name!r} has {n} users (< {SMALL_SEGMENT}): its figures are noisy"
                for name, n in self.populations().items() if n < SMALL_SEGMENT]


def temporal_split(data: Interactions, quantile: float = TEMPORAL_QUANTILE, positive: float = POSITIVE,
                   created_at: dict[int, int] | None = None) -> TemporalSplit:
    """One global cutoff at the `quantile` of interaction times. An item is cold when it has no interaction
    before the cutoff (or, where the catalog says, was created after it); a user is cold likewise."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be within (0, 1), not {quantile}")
    cutoff = int(np.quantile(data.time, quantile))
    before = data.time < cutoff
    train = data.take(before)
    warm_items = set(train.item.tolist())
    if created_at:
        warm_items -= {item for item, stamp in created_at.items() if stamp is not None and stamp >= cutoff}
        train = train.take(np.isin(train.item, list(warm_items)))
    warm_users = set(train.take(train.rating >= positive).user.tolist())
    after = data.take(~before & (data.rating >= positive))
    split = TemporalSplit(cutoff, train)
    cold_ids = set()
    for user, item in zip(after.user.tolist(), after.item.tolist()):
        if user not in warm_users:
            split.cold_users.setdefault(user, set()).add(item)
        elif item in warm_items:
            split.warm_items.setdefault(user, set()).add(item)
        else:
            split.cold_items.setdefault(user, set()).add(item)
            cold_ids.add(item)
    all_after = set(data.take(~before).item.tolist()) - warm_items
    split.cold_item_ids = np.array(sorted(all_after | cold_ids), dtype=np.int64)
    return split


# ---- metrics ---------------------------------------------------------------------------------------------
def rank_metrics(ranked: np.ndarray, truth: set[int]) -> tuple[float, float, float]:
    """(recall@10, recall@50, nDCG@10) of one ranked list (item ids, best first) against a user's positives."""
    top = [int(i) for i in ranked[:50]]
    hits10 = sum(1 for i in top[:10] if i in truth)
    hits50 = sum(1 for i in top if i in truth)
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(top[:10]) if i in truth)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(10, len(truth))))
    return hits10 / len(truth), hits50 / len(truth), dcg / idcg


METRICS = ("recall@10", "recall@50", "ndcg@10")


def summarise(per_user: list[tuple[float, float, float]]) -> dict:
    """Mean and standard error (over users) of each metric, and the number of users."""
    values = np.asarray(per_user, dtype=np.float64).reshape(-1, len(METRICS))
    n = len(values)
    out: dict = {"users": n}
    for k, name in enumerate(METRICS):
        out[name] = float(values[:, k].mean()) if n else float("nan")
        out[f"{name}_se"] = float(values[:, k].std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return out


def pool(summaries: list[dict]) -> dict:
    """Several seeds' summaries as one: the mean over seeds, and its standard error from the seeds' own
    (sqrt of the mean squared SE over the number of seeds: users repeat across seeds, so this is not the SE of
    one larger sample)."""
    out: dict = {"users": int(round(np.mean([s["users"] for s in summaries]))), "seeds": len(summaries)}
    for name in METRICS:
        out[name] = float(np.mean([s[name] for s in summaries]))
        out[f"{name}_se"] = float(math.sqrt(np.mean([s[f"{name}_se"] ** 2 for s in summaries]) / len(summaries)))
    return out
