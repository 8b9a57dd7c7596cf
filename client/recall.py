"""Recall: the channels that propose candidates for one user, each a small object behind one interface.

    cooccurrence  items liked by the same users as the user's recent likes (training interactions only)
    item2item     content neighbours (catalog index) of the recent likes
    semantic      the user's interest vectors against the whole catalog
    popularity    the fallback for cold start, and a prior for everyone

Each channel returns its proposals best first; a `CandidatePool` takes up to the channel's quota of them,
skipping excluded items, and keeps per candidate the best score per channel and the history item that caused
it (for the explanation). Everything here is plain numpy/scipy: no server is involved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, Sequence

import numpy as np
from scipy import sparse

from client.catalog import Interactions
from client.index import ItemIndex


class RecallChannel(StrEnum):
    COOCCURRENCE = "cooccurrence"
    ITEM2ITEM = "item2item"
    SEMANTIC = "semantic"
    POPULARITY = "popularity"

    @classmethod
    def parse_many(cls, names: Sequence[str]) -> tuple["RecallChannel", ...]:
        unknown = [n for n in names if n not in cls._value2member_map_]
        if unknown:
            raise ValueError(f"unknown recall channel(s) {unknown}; choose from {[c.value for c in cls]}")
        return tuple(cls(n) for n in names)


ALL_CHANNELS = tuple(RecallChannel)


@dataclass
class Candidate:
    """One recalled item: its best score in every channel that proposed it, and why it was proposed."""

    item_id: int
    scores: dict[RecallChannel, float] = field(default_factory=dict)
    because: int | None = None   # the history item that caused it (co-occurrence, item-to-item)

    def offer(self, channel: RecallChannel, score: float, cause: int | None) -> None:
        if score > self.scores.get(channel, -np.inf):
            self.scores[channel] = float(score)
            if cause is not None and self.because is None:
                self.because = int(cause)


@dataclass(frozen=True)
class Proposals:
    """A channel's answer, best first. `causes` may be None (no history item behind these proposals)."""

    item_ids: np.ndarray
    scores: np.ndarray
    causes: np.ndarray | None = None


class CandidatePool:
    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.candidates: dict[int, Candidate] = {}

    def add(self, channel: RecallChannel, proposals: Proposals, quota: int) -> int:
        """Takes up to `quota` proposals that are not excluded; returns how many it took."""
        causes = proposals.causes if proposals.causes is not None else [None] * len(proposals.item_ids)
        taken = 0
        for item_id, score, cause in zip(proposals.item_ids, proposals.scores, causes):
            if taken >= quota:
                break
            item_id = int(item_id)
            if item_id < 0 or item_id in self.exclude:
                continue
            candidate = self.candidates.setdefault(item_id, Candidate(item_id))
            candidate.offer(channel, score, None if cause is None else int(cause))
            taken += 1
        return taken

    def using(self, channels: Sequence[RecallChannel]) -> dict[int, Candidate]:
        """Candidates proposed by at least one of `channels` (an ablation may switch channels off)."""
        return {i: c for i, c in self.candidates.items() if any(ch in c.scores for ch in channels)}


# ---- what the interactions teach: fitted once ----------------------------------------------------------
@dataclass
class InteractionModel:
    """Popularity, item-item co-occurrence and every user's history, from training interactions only."""

    item_ids: np.ndarray                 # the catalog index's items, in its order
    column: dict[int, int]               # item id -> position in `item_ids`
    popularity: np.ndarray               # positive interactions per item
    interacted: np.ndarray               # True for an item with any training interaction (False: a new item)
    cooccurrence: sparse.csr_matrix      # cosine-normalised item-item co-occurrence of positives
    histories: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]  # user -> (items, ratings, times), oldest first

    @classmethod
    def fit(cls, train: Interactions, item_ids: np.ndarray, positive_rating: float) -> "InteractionModel":
        column = {int(i): c for c, i in enumerate(item_ids)}
        pos = train.take(train.rating >= positive_rating)
        popularity = np.bincount([column[int(i)] for i in pos.item], minlength=len(item_ids)).astype(np.float32)
        interacted = np.zeros(len(item_ids), dtype=bool)
        interacted[[column[int(i)] for i in np.unique(train.item) if int(i) in column]] = True
        users = np.unique(train.user)
        user_row = {int(u): r for r, u in enumerate(users)}
        rows = np.array([user_row[int(u)] for u in pos.user], dtype=np.int64)
        cols = np.array([column[int(i)] for i in pos.item], dtype=np.int64)
        matrix = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), len(item_ids)))
        matrix.data[:] = 1.0
        counts = np.asarray(matrix.sum(axis=0)).ravel()
        norm = sparse.diags(1.0 / np.sqrt(np.maximum(counts, 1)))
        cooc = (matrix.T @ matrix).tocsr()
        cooc.setdiag(0)
        histories = {}
        starts = np.flatnonzero(np.r_[True, train.user[1:] != train.user[:-1]])
        ends = np.r_[starts[1:], len(train)]
        for a, b in zip(starts, ends):
            histories[int(train.user[a])] = (train.item[a:b], train.rating[a:b], train.time[a:b])
        return cls(np.asarray(item_ids), column, popularity, interacted, (norm @ cooc @ norm).tocsr(), histories)


# ---- the channels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seeds:
    """What a channel may start from: the user's recent likes with their weights, and the interest vectors."""

    recent: np.ndarray            # item ids, oldest first
    recent_weights: np.ndarray
    interests: np.ndarray         # [m, D]
    interest_weights: np.ndarray  # [m]
    interest_index: ItemIndex | None = None   # where `interests` live (the recommendation encoder's index), if not
                                              # the catalog index

    @property
    def cold(self) -> bool:
        return len(self.recent) == 0


class Channel(Protocol):
    channel: RecallChannel

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        """Proposals best first, at least `wanted` of them where there are that many; None if it has none."""


@dataclass(frozen=True)
class CooccurrenceChannel:
    model: InteractionModel
    channel: RecallChannel = RecallChannel.COOCCURRENCE

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        if seeds.cold:
            return None
        rows = self.model.cooccurrence[[self.model.column[int(i)] for i in seeds.recent]]
        contributions = rows.multiply(seeds.recent_weights[:, None]).tocsc()
        totals = np.asarray(contributions.sum(axis=0)).ravel()
        top = np.argsort(-totals)[:wanted]
        top = top[totals[top] > 0]
        # For each candidate, the recent like that contributed most: one sparse argmax, not a slice per item.
        causes = seeds.recent[np.asarray(contributions[:, top].argmax(axis=0)).ravel()] if len(top) else np.zeros(0)
        return Proposals(self.model.item_ids[top], totals[top], causes)


@dataclass(frozen=True)
class ItemToItemChannel:
    neighbours: int = 20
    channel: RecallChannel = RecallChannel.ITEM2ITEM

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        if seeds.cold:
            return None
        ids, scores = index.search(index.vectors_of(seeds.recent), self.neighbours, index.encoder)
        flat = np.argsort(-scores.ravel())
        return Proposals(ids.ravel()[flat], scores.ravel()[flat], np.repeat(seeds.recent, ids.shape[1])[flat])


@dataclass(frozen=True)
class SemanticChannel:
    channel: RecallChannel = RecallChannel.SEMANTIC

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        if seeds.cold:
            return None
        space = seeds.interest_index or index
        ids, scores = space.search(seeds.interests, wanted, space.encoder)
        weighted = scores * seeds.interest_weights[:, None]
        flat = np.argsort(-weighted.ravel())
        return Proposals(ids.ravel()[flat], weighted.ravel()[flat])


@dataclass(frozen=True)
class PopularityChannel:
    model: InteractionModel
    channel: RecallChannel = RecallChannel.POPULARITY

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        order = np.argsort(-self.model.popularity)
        pop = self.model.popularity[order]
        return Proposals(self.model.item_ids[order], np.log1p(pop) / max(np.log1p(pop[0]), 1e-12))


def default_channels(model: InteractionModel) -> dict[RecallChannel, Channel]:
    return {RecallChannel.COOCCURRENCE: CooccurrenceChannel(model), RecallChannel.ITEM2ITEM: ItemToItemChannel(),
            RecallChannel.SEMANTIC: SemanticChannel(), RecallChannel.POPULARITY: PopularityChannel(model)}


def recall(channels: dict[RecallChannel, Channel], seeds: Seeds, index: ItemIndex, exclude: set[int],
           quotas: dict[RecallChannel, int]) -> CandidatePool:
    """Every channel in turn (in RecallChannel order), each up to its quota of items not excluded."""
    pool = CandidatePool(exclude)
    for name in RecallChannel:
        if name not in channels:
            continue
        proposals = channels[name].propose(seeds, index, quotas[name] + len(exclude))
        if proposals is not None:
            pool.add(name, proposals, quotas[name])
    return pool
