"""Scorers: how much a user (their training history) should like each of a set of candidate items. The cold-start
protocols rank hidden items with these; the baselines and the recommender's content channels share one interface.

    random          a seeded draw: the floor
    genres          overlap of the item's categories with the user's liked categories (cosine)
    tfidf           scikit-learn's TfidfVectorizer on the same item text the encoder sees, fitted on training items
    vectors         the encoder's item vectors (raw, centred, or fine-tuned), with one of the user representations:
                      mean      the mean of the liked items' vectors
                      interests the recommender's semantic channel: weighted spherical k-means interest vectors
                                (client.profiles), the best interest per item
                      maxsim    the recommender's item-to-item channel: the mean of the m highest similarities
                                between the item and the recent liked items
    popularity      training positives per item (zero for every hidden item: shown to make the point)

`UserHistory` is what a scorer may see of a user: training interactions only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from bert_recsys.client.catalog import Item, Interactions
from bert_recsys.client.profiles import weighted_kmeans
from bert_recsys.client.recall import EASE_LAMBDA, RecallChannel, ease_weights


@dataclass(frozen=True)
class UserHistory:
    user_id: int
    items: np.ndarray       # item ids, oldest first
    ratings: np.ndarray
    times: np.ndarray
    positive: float = 4.0

    @property
    def liked(self) -> np.ndarray:
        return self.items[self.ratings >= self.positive]

    def liked_weights(self, half_life_days: float = 365.0) -> np.ndarray:
        """The recommender's weights (client.profiles): recency-decayed, times how far the rating is above liking."""
        mask = self.ratings >= self.positive
        times, ratings = self.times[mask], self.ratings[mask]
        if not len(times):
            return np.zeros(0)
        age_days = (times.max() - times) / 86400.0
        return 0.5 ** (age_days / half_life_days) * (ratings - self.positive + 1.0)


def histories(train: Interactions, positive: float = 4.0) -> dict[int, UserHistory]:
    """Every user's training interactions, oldest first."""
    out = {}
    starts = np.flatnonzero(np.r_[True, train.user[1:] != train.user[:-1]]) if len(train) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(train)]
    for a, b in zip(starts, ends):
        out[int(train.user[a])] = UserHistory(int(train.user[a]), train.item[a:b], train.rating[a:b], train.time[a:b], positive)
    return out


class Scorer(Protocol):
    name: str

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        """One score per candidate item id (higher is better)."""


def rank(scorer: Scorer, user: UserHistory, candidates: np.ndarray, k: int = 50) -> np.ndarray:
    """The top-k candidates, best first (ties broken by candidate order, which callers keep sorted by id)."""
    scores = np.asarray(scorer.score(user, candidates), dtype=np.float64)
    top = np.argsort(-scores, kind="stable")[:k]
    return candidates[top]


@dataclass
class RandomScorer:
    seed: int = 0
    name: str = "random"

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        return np.random.default_rng([self.seed, int(user.user_id) & 0x7FFFFFFF]).random(len(candidates))


class _RowMatrix:
    """Rows of an item matrix looked up by item id."""

    def __init__(self, item_ids: Sequence[int], matrix):
        self.row = {int(i): r for r, i in enumerate(item_ids)}
        self.matrix = matrix

    def rows(self, item_ids) -> np.ndarray:
        return np.fromiter((self.row[int(i)] for i in item_ids), dtype=np.int64, count=len(item_ids))


class GenreScorer:
    name = "genres"

    def __init__(self, items: Sequence[Item]):
        names = sorted({c for item in items for c in item.categories})
        column = {c: k for k, c in enumerate(names)}
        matrix = np.zeros((len(items), max(len(names), 1)), dtype=np.float32)
        for r, item in enumerate(items):
            for c in item.categories:
                matrix[r, column[c]] = 1.0
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        self.items = _RowMatrix([i.item_id for i in items], matrix)

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        liked = self.items.matrix[self.items.rows(user.liked)]
        profile = liked.sum(axis=0)
        profile /= max(np.linalg.norm(profile), 1e-12)
        return self.items.matrix[self.items.rows(candidates)] @ profile


def user_vector_scores(candidates: np.ndarray, liked: np.ndarray, weights: np.ndarray, representation: str,
                       m: int = 3, interests: int = 3) -> np.ndarray:
    """Scores of candidate vectors [n, D] for a user whose liked items' vectors are `liked` [k, D]."""
    if not len(liked):
        return np.zeros(len(candidates))
    if representation == "mean":
        return candidates @ liked.mean(axis=0)
    if representation == "maxsim":
        similarity = candidates @ liked.T
        top = min(m, similarity.shape[1])
        return np.partition(similarity, similarity.shape[1] - top, axis=1)[:, -top:].mean(axis=1)
    if representation == "interests":
        k = min(interests, 1 + len(liked) // 10)
        centres, mass = weighted_kmeans(liked, np.maximum(weights, 1e-6), k)
        return (candidates @ centres.T * mass).max(axis=1)
    raise ValueError(f"unknown user representation {representation!r}: mean, maxsim or interests")


REPRESENTATIONS = ("mean", "maxsim", "interests")


@dataclass
class VectorScorer:
    """Cosine scores from item vectors (rows L2-normalised), a user represented as `representation`."""

    name: str
    item_ids: np.ndarray
    vectors: np.ndarray
    representation: str = "maxsim"
    m: int = 3
    recent: int = 0           # 0: every liked item; else the most recent n (the recommender uses 20)

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"unknown user representation {self.representation!r}; choose from {REPRESENTATIONS}")
        self._items = _RowMatrix(self.item_ids, np.asarray(self.vectors, dtype=np.float32))

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        liked, weights = user.liked, user.liked_weights()
        if self.recent:
            liked, weights = liked[-self.recent:], weights[-self.recent:]
        matrix = self._items.matrix
        return user_vector_scores(matrix[self._items.rows(candidates)], matrix[self._items.rows(liked)], weights,
                                  self.representation, self.m)


# How a new item (no interaction) is scored for a user, chosen on the validation split of item cold-start seed 0:
# "more like this" from the general encoder (the mean of the 3 highest similarities to any liked item: sequels,
# the same subject) plus TASTE_WEIGHT x taste from the recommendation encoder (the item's cosine with the mean of
# the liked items), both centred. The recommender places new items with it (`fresh_slots`); client.coldstart
# reports it as "content".
SIMILAR_M = 3
TASTE_WEIGHT = 0.5


def content_scores(candidates: np.ndarray, liked: np.ndarray, taste_candidates: np.ndarray | None = None,
                   taste_liked: np.ndarray | None = None, taste_weight: float = TASTE_WEIGHT,
                   m: int = SIMILAR_M) -> np.ndarray:
    """[n] scores of candidate vectors [n, D] for a user whose liked items' vectors are `liked` [k, D], plus the
    taste term where the recommendation encoder's vectors of both are given."""
    scores = user_vector_scores(candidates, liked, np.ones(len(liked)), "maxsim", m)
    if taste_candidates is not None and taste_liked is not None and len(taste_liked):
        scores = scores + taste_weight * user_vector_scores(taste_candidates, taste_liked, np.ones(len(taste_liked)), "mean")
    return scores


@dataclass
class ContentScorer:
    """`content_scores` over two item matrices (the general encoder's and, optionally, the recommendation
    encoder's), in the same item order."""

    name: str
    item_ids: np.ndarray
    vectors: np.ndarray
    taste_vectors: np.ndarray | None = None
    taste_weight: float = TASTE_WEIGHT

    def __post_init__(self):
        self._items = _RowMatrix(self.item_ids, np.asarray(self.vectors, dtype=np.float32))
        self._taste = None if self.taste_vectors is None else np.asarray(self.taste_vectors, dtype=np.float32)

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        cand, liked = self._items.rows(candidates), self._items.rows(user.liked)
        taste = (self._taste[cand], self._taste[liked]) if self._taste is not None else (None, None)
        return content_scores(self._items.matrix[cand], self._items.matrix[liked], *taste, self.taste_weight)


def centred(vectors: np.ndarray, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Vectors minus the mean of `fit_rows` (all rows by default), re-normalised: the catalog's common direction
    removed (client.index.IndexSettings.centre does the same in the served index)."""
    mean = vectors[fit_rows].mean(axis=0) if fit_rows is not None else vectors.mean(axis=0)
    moved = vectors - mean
    return moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)


class TfidfScorer:
    """Word overlap, the baseline a text encoder must beat: scikit-learn's TfidfVectorizer (sublinear tf, English
    stop words, words seen in >= 2 items) on `texts`, fitted on the `fit_ids` items only (the training items)."""

    def __init__(self, name: str, item_ids: Sequence[int], texts: Sequence[str], fit_ids: Sequence[int],
                 representation: str = "mean", m: int = 3, ngrams: int = 1):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import normalize

        self.name, self.representation, self.m = name, representation, m
        rows = _RowMatrix(item_ids, None)
        fit_rows = rows.rows(fit_ids)
        vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=2, ngram_range=(1, ngrams),
                                     dtype=np.float32)
        vectorizer.fit([texts[r] for r in fit_rows])
        rows.matrix = normalize(vectorizer.transform(texts)).tocsr()
        self._items = rows

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        matrix = self._items.matrix
        cand = matrix[self._items.rows(candidates)]
        liked = matrix[self._items.rows(user.liked)]
        if liked.shape[0] == 0:
            return np.zeros(len(candidates))
        if self.representation == "mean":
            return np.asarray(cand @ np.asarray(liked.mean(axis=0)).ravel()).ravel()
        if self.representation == "maxsim":
            similarity = (cand @ liked.T).toarray()
            top = min(self.m, similarity.shape[1])
            return np.partition(similarity, similarity.shape[1] - top, axis=1)[:, -top:].mean(axis=1)
        raise ValueError(f"TF-IDF user representation must be mean or maxsim, not {self.representation!r}")


@dataclass
class PopularityScorer:
    """Training positives per item; ties (every never-interacted item scores 0) are broken at random, not by
    id order (MovieLens ids grow with the release year, which would leak a signal)."""

    popularity: dict[int, float]
    name: str = RecallChannel.POPULARITY.value
    seed: int = 0

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        jitter = RandomScorer(self.seed).score(user, candidates) * 1e-6
        return np.array([self.popularity.get(int(i), 0.0) for i in candidates]) + jitter


class EaseScorer:
    """EASE^R (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): an item-item weight
    matrix B = I - P diag(1/diag(P)), P = (X'X + lambda I)^-1, closed form, from binary training positives.
    The collaborative-filtering baseline for warm items (the recommender's co-occurrence channel uses the same
    `client.recall.ease_weights`): on MovieLens-sized data it matches or beats implicit ALS
    and neural CF in published comparisons, it has one setting (lambda, chosen on validation), and it needs
    no package beyond numpy and scipy. Items without a training positive get no weights (it cannot score new items)."""

    name = "ease"

    def __init__(self, train: Interactions, lam: float = EASE_LAMBDA, positive: float = 4.0,
                 side: Callable[[np.ndarray], np.ndarray] | None = None):
        """`side`: the items' side information joined to the Gram matrix (`ease_weights`), as a function of the
        item ids EASE^R scores (`item_ids`, those with a training positive) -> [items, items]."""
        from scipy import sparse

        pos = train.take(train.rating >= positive)
        self.item_ids = np.unique(pos.item)
        self.column = {int(i): c for c, i in enumerate(self.item_ids)}
        users = np.unique(pos.user)
        row = np.searchsorted(users, pos.user)
        col = np.searchsorted(self.item_ids, pos.item)
        x = sparse.csr_matrix((np.ones(len(row), dtype=np.float32), (row, col)), shape=(len(users), len(self.item_ids)))
        x.data[:] = 1.0
        self.weights = ease_weights(x, lam, side=None if side is None else side(self.item_ids))

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        known = [self.column[int(i)] for i in user.liked if int(i) in self.column]
        if not known:
            return np.zeros(len(candidates))
        totals = self.weights[known].sum(axis=0)
        return np.array([totals[self.column[int(i)]] if int(i) in self.column else -np.inf for i in candidates])
