"""Ranking: blend the channels' scores, diversify with MMR under a per-category cap, explain. Pure functions of
arrays and candidates: unit-tested without a server."""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np

from bert_recsys.client.profiles import UserProfile
from bert_recsys.client.recall import Candidate, RecallChannel


def min_max(values: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1]; NaN (not proposed by that channel) becomes 0; a constant column becomes 1."""
    present = ~np.isnan(values)
    if not present.any():
        return np.zeros(len(values), dtype=np.float32)
    low, high = np.nanmin(values), np.nanmax(values)
    return np.where(present, (values - low) / (high - low) if high > low else 1.0, 0.0).astype(np.float32)


def fill_scores(candidates: Sequence[Candidate], channel: RecallChannel, scores: np.ndarray | None) -> None:
    """Gives every candidate `channel`'s score (NaN: the channel cannot score it, left out), keeping the best
    score where the channel proposed it already. The explanation (`because`) stays the proposing channel's."""
    if scores is None:
        return
    for candidate, score in zip(candidates, scores):
        if not np.isnan(score) and score > candidate.scores.get(channel, -np.inf):
            candidate.scores[channel] = float(score)


def blend(candidates: Sequence[Candidate], channels: Sequence[RecallChannel],
          weights: dict[RecallChannel, float]) -> np.ndarray:
    """Sum over `channels` of weight x the channel's score, each min-max normalised over these candidates. Where
    every channel that scored something weighs 0 (a cold user, whom only popularity can serve; an ablation
    keeping popularity alone), each of those weighs 1 instead."""
    total = np.zeros(len(candidates), dtype=np.float32)
    raws = {channel: np.array([c.scores.get(channel, np.nan) for c in candidates], dtype=np.float32)
            for channel in channels}
    present = [channel for channel, raw in raws.items() if (~np.isnan(raw)).any()]
    if not any(weights[channel] for channel in present):
        weights = {channel: 1.0 for channel in present}
    for channel in present:
        total += weights[channel] * min_max(raws[channel])
    return total


def mmr(vectors: np.ndarray, scores: np.ndarray, n: int, category_of: Callable[[int], str], mmr_lambda: float,
        category_cap: int, pool: int | None = None) -> list[int]:
    """Greedy maximal marginal relevance with a per-category cap: rows of `vectors`/`scores`, best first.
    Only the top `pool` rows by score are considered (default max(10 n, 100))."""
    order = list(np.argsort(-scores, kind="stable")[: pool or max(n * 10, 100)])  # ties: in recall order
    chosen: list[int] = []
    per_category: Counter = Counter()
    while order and len(chosen) < n:
        if chosen:
            redundancy = (vectors[order] @ vectors[chosen].T).max(axis=1)
            marginal = mmr_lambda * scores[order] - (1 - mmr_lambda) * redundancy
        else:
            marginal = scores[order]
        for position in np.argsort(-marginal, kind="stable"):
            row = order[position]
            first = category_of(row)
            if per_category[first] < category_cap:
                break
        else:
            break  # every remaining item is over its category cap
        chosen.append(row)
        per_category[first] += 1
        order.remove(row)
    return chosen


def with_fresh(chosen: list[int], fresh: list[int], n: int) -> list[int]:
    """The list `chosen` (rows, best first, cut to n) with every `fresh` row (new items) in it: those already in
    the list stay where they are; the others take the list's free places, then replace its last established
    items, and go at its end. So the established items keep their order, and at most len(fresh) of them leave."""
    out = list(chosen[:n])
    missing = [row for row in fresh if row not in out]
    surplus = len(out) + len(missing) - n
    for position in range(len(out) - 1, -1, -1):
        if surplus <= 0:
            break
        if out[position] not in fresh:
            del out[position]
            surplus -= 1
    return (out + missing)[:n]


def explain(candidate: Candidate, profile: UserProfile, title_of: Callable[[int], str], new: bool = False) -> str:
    """One line a user can read: which channel proposed the item, and because of which history item."""
    channels, because = candidate.scores, candidate.because
    if new and because is not None:
        return f"new: because you liked {title_of(because)}"
    parts = []
    if RecallChannel.COOCCURRENCE in channels and because is not None:
        parts.append(f"liked by people who liked {title_of(because)}")
    elif RecallChannel.ITEM2ITEM in channels and because is not None:
        parts.append(f"similar to {title_of(because)}")
    if RecallChannel.SEMANTIC in channels:
        top = ", ".join(c for c, _ in profile.top_categories[:2])
        parts.append(f"matches your interests ({top})")
    if RecallChannel.POPULARITY in channels and not parts:
        parts.append("popular right now" if profile.is_cold else "popular with everyone")
    return "; ".join(parts) or "recommended"
