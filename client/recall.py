"""Recall: the channels that propose candidates for one user, each a small object behind one interface.

    cooccurrence  items liked by the same users as the user's likes: EASE^R's item-item weights over all the likes
                  (catalogs up to `ease_max_items`), else cosine co-occurrence of the recent likes
    item2item     content neighbours (catalog index) of the recent likes
    semantic      the user's interest vectors against the whole catalog
    popularity    the fallback for cold start, and a prior for everyone

Each channel returns its proposals best first; a `CandidatePool` takes up to the channel's quota of them,
skipping excluded items, and keeps per candidate the best score per channel and the history item that caused
it (for the explanation). Each channel can also score any item (`score`), so the ranker sees every channel's
score for every candidate, not only for the ones that channel proposed. Everything here is plain numpy/scipy: no
server is involved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, Sequence

import numpy as np
from scipy import sparse

from bert_recsys.client.catalog import Interactions
from bert_recsys.client.index import ItemIndex


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
EASE_LAMBDA = 100.0       # chosen on the warm protocol's inner time split of ml-latest-small (client.evaluate)
EASE_MAX_ITEMS = 20_000   # EASE^R keeps a dense [n, n] matrix (1.6 GB at 20k items): above this, co-occurrence


def ease_weights(positives: sparse.spmatrix, lam: float, side: np.ndarray | None = None) -> np.ndarray:
    """EASE^R (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): from a binary
    [users, items] matrix, B = I - P diag(1/diag(P)) with P = (X'X + lam I)^-1 and a zero diagonal, in closed
    form. [items, items] float32; an item without positives gets zero weights both ways (and is left out of the
    inverse, which is what it would give it anyway). `side`: an [items, items] positive semi-definite matrix added
    to X'X, the items' side information (Jeunen et al., "Closed-Form Models for Collaborative Filtering with
    Side-Information", RecSys 2020), e.g. alpha times the cosines of their text embeddings."""
    from scipy.linalg import lapack

    if lam <= 0:
        raise ValueError(f"EASE^R's lambda must be > 0, not {lam}")
    x = sparse.csc_matrix(positives, dtype=np.float32)
    active = np.flatnonzero(np.diff(x.indptr) > 0)
    x = x[:, active]
    gram = np.asarray((x.T @ x).todense(), dtype=np.float32)
    if side is not None:
        if side.shape != (positives.shape[1], positives.shape[1]):
            raise ValueError(f"side information must be [items, items] = {(positives.shape[1],) * 2}, not {side.shape}")
        gram += side[np.ix_(active, active)]
    gram[np.diag_indices_from(gram)] += lam
    # X'X + lam I is symmetric positive definite: a Cholesky factor, then the inverse from it (half LU's work),
    # in float32 (lam keeps it well conditioned; 9.7k items take seconds, not tens of seconds).
    factor, info = lapack.spotrf(gram, lower=True, overwrite_a=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE^R: Cholesky failed (info {info})")
    p, info = lapack.spotri(factor, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE^R: inverse failed (info {info})")
    p = np.tril(p) + np.tril(p, -1).T
    b = p / (-np.diag(p))
    b[np.diag_indices_from(b)] = 0.0
    out = np.zeros((positives.shape[1], positives.shape[1]), dtype=np.float32)
    out[np.ix_(active, active)] = b
    return out


@dataclass
class InteractionModel:
    """Popularity, item-item collaborative filtering and every user's history, from training interactions only."""

    item_ids: np.ndarray                 # the catalog index's items, in its order
    column: dict[int, int]               # item id -> position in `item_ids`
    popularity: np.ndarray               # positive interactions per item
    interacted: np.ndarray               # True for an item with any training interaction (False: a new item)
    histories: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]  # user -> (items, ratings, times), oldest first
    # The item-item CF, one of the two: EASE^R's weights [items, items] where the catalog is small enough, else
    # the cosine-normalised co-occurrence of positives.
    ease: np.ndarray | None = None
    cooccurrence: sparse.csr_matrix | None = None

    @classmethod
    def fit(cls, train: Interactions, item_ids: np.ndarray, positive_rating: float,
            ease_lambda: float | None = EASE_LAMBDA, ease_max_items: int = EASE_MAX_ITEMS) -> "InteractionModel":
        """`ease_lambda` None (or a catalog over `ease_max_items`) leaves EASE^R out: co-occurrence only."""
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
        histories = {}
        starts = np.flatnonzero(np.r_[True, train.user[1:] != train.user[:-1]])
        ends = np.r_[starts[1:], len(train)]
        for a, b in zip(starts, ends):
            histories[int(train.user[a])] = (train.item[a:b], train.rating[a:b], train.time[a:b])
        model = cls(np.asarray(item_ids), column, popularity, interacted, histories)
        if ease_lambda is not None and len(item_ids) <= ease_max_items:
            model.ease = ease_weights(matrix, ease_lambda)
        else:
            counts = np.asarray(matrix.sum(axis=0)).ravel()
            norm = sparse.diags(1.0 / np.sqrt(np.maximum(counts, 1)))
            cooc = (matrix.T @ matrix).tocsr()
            cooc.setdiag(0)
            model.cooccurrence = (norm @ cooc @ norm).tocsr()
        return model

    def columns(self, item_ids) -> np.ndarray:
        """Positions of `item_ids` in the model; -1 for an item it does not know (added after it was fitted)."""
        return np.array([self.column.get(int(i), -1) for i in item_ids], dtype=np.int64)


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
    liked: np.ndarray | None = None           # every liked item id, oldest first (EASE^R reads them all)
    # What a channel computed for these seeds, kept for the rest of this one request (recall, then scoring).
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def all_liked(self) -> np.ndarray:
        return self.recent if self.liked is None else self.liked

    @property
    def cold(self) -> bool:
        return len(self.recent) == 0


class Channel(Protocol):
    channel: RecallChannel

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        """Proposals best first, at least `wanted` of them where there are that many; None if it has none."""

    def score(self, seeds: Seeds, index: ItemIndex, item_ids: np.ndarray) -> np.ndarray | None:
        """The score `propose` would give each of `item_ids` (NaN where it cannot score one); None if none."""


@dataclass(frozen=True)
class CooccurrenceChannel:
    model: InteractionModel
    channel: RecallChannel = RecallChannel.COOCCURRENCE

    def _contributions(self, seeds: Seeds):
        """[likes, items]: each like's weight on every item, and the likes behind the rows."""
        m = self.model
        if m.ease is not None:
            liked = np.array([i for i in seeds.all_liked if int(i) in m.column], dtype=np.int64)
            return m.ease[m.columns(liked)], liked
        recent = np.array([i for i in seeds.recent if int(i) in m.column], dtype=np.int64)
        weights = seeds.recent_weights[[k for k, i in enumerate(seeds.recent) if int(i) in m.column]]
        return m.cooccurrence[m.columns(recent)].multiply(weights[:, None]).tocsc(), recent

    def _totals(self, seeds: Seeds):
        """(contributions, the likes behind its rows, their sum per item), or None for a user with no known like;
        computed once per request (`Seeds.memo`): recall proposes from it, then the ranker scores from it."""
        if seeds.cold:
            return None
        if self.channel not in seeds.memo:
            contributions, likes = self._contributions(seeds)
            seeds.memo[self.channel] = (contributions, likes, np.asarray(contributions.sum(axis=0)).ravel()) \
                if len(likes) else None
        return seeds.memo[self.channel]

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        if (found := self._totals(seeds)) is None:
            return None
        contributions, likes, totals = found
        top = np.argsort(-totals)[:wanted]
        top = top[totals[top] > 0]
        # For each candidate, the like that contributed most: one argmax over the rows, not a slice per item.
        causes = likes[np.asarray(contributions[:, top].argmax(axis=0)).ravel()] if len(top) else np.zeros(0)
        return Proposals(self.model.item_ids[top], totals[top], causes)

    def score(self, seeds: Seeds, index: ItemIndex, item_ids: np.ndarray) -> np.ndarray | None:
        if (found := self._totals(seeds)) is None:
            return None
        totals = found[2]
        cols = self.model.columns(item_ids)
        return np.where(cols >= 0, totals[np.maximum(cols, 0)], np.nan)


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

    def score(self, seeds: Seeds, index: ItemIndex, item_ids: np.ndarray) -> np.ndarray | None:
        if seeds.cold:
            return None
        similarity = index.vectors_of(item_ids) @ index.vectors_of(seeds.recent).T
        return similarity.max(axis=1)


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

    def score(self, seeds: Seeds, index: ItemIndex, item_ids: np.ndarray) -> np.ndarray | None:
        if seeds.cold:
            return None
        space = seeds.interest_index or index
        known = np.array([space.has(i) for i in item_ids])
        out = np.full(len(item_ids), np.nan, dtype=np.float32)
        if known.any():
            out[known] = (space.vectors_of(item_ids[known]) @ (seeds.interests * seeds.interest_weights[:, None]).T).max(axis=1)
        return out


@dataclass(frozen=True)
class PopularityChannel:
    model: InteractionModel
    channel: RecallChannel = RecallChannel.POPULARITY

    def propose(self, seeds: Seeds, index: ItemIndex, wanted: int) -> Proposals | None:
        order = np.argsort(-self.model.popularity)
        pop = self.model.popularity[order]
        return Proposals(self.model.item_ids[order], np.log1p(pop) / max(np.log1p(pop[0]), 1e-12))

    def score(self, seeds: Seeds, index: ItemIndex, item_ids: np.ndarray) -> np.ndarray | None:
        pop = self.model.popularity
        cols = self.model.columns(item_ids)
        return np.where(cols >= 0, np.log1p(pop[np.maximum(cols, 0)]), 0.0) / max(np.log1p(pop.max(initial=0.0)), 1e-12)


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
