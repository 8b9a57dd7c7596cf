"""User profiles: what a user's history says about them, computed from the catalog index's vectors.

A profile depends only on the fitted histories and on the index (its vectors): `ProfileCache` computes it once
per (index, user) and is dropped whole when the recommender switches to another index.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from weakref import WeakKeyDictionary

import numpy as np

from bert_recsys.client.catalog import Item
from bert_recsys.client.index import ItemIndex

STOPWORDS = set("the a an of and in on to for with at from by is it its de la le el les das der die".split())


@dataclass
class UserProfile:
    user_id: int
    history: np.ndarray               # item ids, oldest first
    liked: np.ndarray                 # liked item ids, oldest first
    liked_weights: np.ndarray         # recency x rating weights of `liked`
    interests: np.ndarray             # [m, D] L2-normalised interest vectors
    interest_weights: np.ndarray      # [m]
    top_categories: list[tuple[str, float]]
    keywords: list[str]
    attributes: dict = field(default_factory=dict)

    @property
    def is_cold(self) -> bool:
        return len(self.liked) == 0

    @property
    def mean_vector(self) -> np.ndarray | None:
        if self.is_cold:
            return None
        v = (self.interests * self.interest_weights[:, None]).sum(axis=0)
        return v / max(np.linalg.norm(v), 1e-12)

    def text(self, items: dict[int, Item], n: int = 8) -> str:
        """The profile as text, for Triton's `score` ensemble: recent liked titles and top categories."""
        titles = [items[i].title for i in self.liked[::-1][:n]]
        categories = ", ".join(c for c, _ in self.top_categories[:4])
        return f"Liked: {'; '.join(titles)}. Favourite genres: {categories}"

    def summary(self) -> str:
        cats = ", ".join(f"{c} {w:.0%}" for c, w in self.top_categories[:4]) or "-"
        return (f"user {self.user_id}: {len(self.history)} rated, {len(self.liked)} liked, "
                f"{len(self.interests)} interest vectors; top categories: {cats}; keywords: {', '.join(self.keywords[:6]) or '-'}")


@dataclass(frozen=True)
class ProfileSettings:
    positive_rating: float = 4.0
    half_life_days: float = 365.0     # recency decay of history items, relative to the user's last action
    max_interests: int = 3            # interest vectors per user (weighted k-means over liked items)


def weighted_kmeans(vectors: np.ndarray, weights: np.ndarray, k: int, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means, deterministic: seeds are the heaviest vectors, spread by farthest-point."""
    k = min(k, len(vectors))
    seeds = [int(np.argmax(weights))]
    while len(seeds) < k:
        similarity = (vectors @ vectors[seeds].T).max(axis=1)
        seeds.append(int(np.argmin(similarity)))
    centers = vectors[seeds].copy()
    for _ in range(iterations):
        assign = np.argmax(vectors @ centers.T, axis=1)
        for c in range(k):
            members = assign == c
            if members.any():
                center = (vectors[members] * weights[members, None]).sum(axis=0)
                centers[c] = center / max(np.linalg.norm(center), 1e-12)
    assign = np.argmax(vectors @ centers.T, axis=1)
    mass = np.array([weights[assign == c].sum() for c in range(k)])
    keep = mass > 0
    return centers[keep], mass[keep] / mass[keep].sum()


def build_profile(user_id: int, history: tuple[np.ndarray, np.ndarray, np.ndarray], index: ItemIndex,
                  items: dict[int, Item], s: ProfileSettings) -> UserProfile:
    """`history` is (items, ratings, times), oldest first; items the index does not hold are ignored."""
    item_ids, ratings, times = history
    known = np.array([index.has(i) for i in item_ids], dtype=bool) if len(item_ids) else np.array([], dtype=bool)
    item_ids, ratings, times = item_ids[known], ratings[known], times[known]
    liked_mask = ratings >= s.positive_rating
    liked, liked_times, liked_ratings = item_ids[liked_mask], times[liked_mask], ratings[liked_mask]
    if len(liked) == 0:
        return UserProfile(int(user_id), item_ids, liked, np.zeros(0), np.zeros((0, index.vectors.shape[1])),
                           np.zeros(0), [], [])
    age_days = (liked_times.max() - liked_times) / 86400.0
    weights = 0.5 ** (age_days / s.half_life_days) * (liked_ratings - s.positive_rating + 1.0)
    vectors = index.vectors_of(liked)
    k = min(s.max_interests, 1 + len(liked) // 10)
    interests, interest_weights = weighted_kmeans(vectors, weights, k)
    categories: Counter = Counter()
    words: Counter = Counter()
    for item_id, weight in zip(liked, weights):
        item = items[int(item_id)]
        for category in item.categories:
            categories[category] += weight
        title = re.sub(r"\(\d{4}\)", "", item.title.lower())
        words.update(w for w in re.findall(r"[a-z]{4,}", title) if w not in STOPWORDS)
    total = sum(categories.values()) or 1.0
    return UserProfile(int(user_id), item_ids, liked, weights, interests, interest_weights,
                       [(c, w / total) for c, w in categories.most_common(6)],
                       [w for w, n in words.most_common(10) if n > 1])


EMPTY_HISTORY = (np.array([], dtype=np.int64),) * 3


class ProfileCache:
    """Profiles per (index, user), built on first use. A new index gets a new cache (its vectors differ)."""

    def __init__(self, histories: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], items: dict[int, Item],
                 settings: ProfileSettings):
        self.histories = histories
        self.items = items
        self.settings = settings
        self._profiles: WeakKeyDictionary[ItemIndex, dict[int, UserProfile]] = WeakKeyDictionary()

    def get(self, user_id: int, index: ItemIndex, attributes: dict | None = None) -> UserProfile:
        # Per index, weakly: an index let go (a canary rolled back) takes its profiles with it.
        per_index = self._profiles.get(index)
        if per_index is None:
            per_index = self._profiles.setdefault(index, {})
        cached = per_index.get(int(user_id))
        if cached is None:
            history = self.histories.get(int(user_id), EMPTY_HISTORY)
            cached = per_index[int(user_id)] = build_profile(user_id, history, index, self.items, self.settings)
        return replace(cached, attributes=dict(attributes)) if attributes else cached
