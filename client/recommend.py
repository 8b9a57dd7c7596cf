"""Recall, scoring and assembly: everything a recommendation does outside Triton.

    history ──profile──▶ interest vectors + top categories
            ──recall───▶ channels (co-occurrence, item-to-item, semantic, popularity), merged with quotas
            ──score────▶ Triton `score` ensemble: the profile's text against every candidate's vector
            ──assemble─▶ filter seen/blocked, blend, MMR diversity, per-category cap, explanations

Only the `score` step (and catalog embedding) calls Triton; all of it goes through `client.triton`.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import sparse

from client.catalog import Interactions, Item
from client.index import ItemIndex
from client.errors import ModelNotFound

CHANNELS = ("cooccurrence", "item2item", "semantic", "popularity")
STOPWORDS = set("the a an of and in on to for with at from by is it its de la le el les das der die".split())


@dataclass(frozen=True)
class RecommenderSettings:
    positive_rating: float = 4.0
    half_life_days: float = 365.0     # recency decay of history items, relative to the user's last action
    max_interests: int = 3            # interest vectors per user (weighted k-means over liked items)
    recent_items: int = 20            # history items that seed item-to-item and co-occurrence recall
    quotas: dict = field(default_factory=lambda: {"cooccurrence": 300, "item2item": 100, "semantic": 100, "popularity": 100})
    # Final blend of per-channel scores (each min-max normalised per user) and Triton's profile score.
    weights: dict = field(default_factory=lambda: {"cooccurrence": 1.0, "item2item": 0.15, "semantic": 0.15,
                                                   "popularity": 0.3, "profile": 0.2})
    mmr_lambda: float = 0.9           # 1 = pure relevance, 0 = pure diversity
    category_cap: int = 5             # at most this many items sharing a first category in one list


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


class Recommender:
    """Fitted on interactions (never on evaluated positives); serves any user through Triton."""

    def __init__(self, items: list[Item], index: ItemIndex, train: Interactions, client,
                 settings: RecommenderSettings = RecommenderSettings(), index_store=None):
        self.items = {item.item_id: item for item in items}
        self.client = client
        self.settings = settings
        # With an IndexStore, the index follows the store's `current` link (a rollout switches it).
        self.index_store = index_store
        self.index_name = index_store.current_name() if index_store is not None else None
        self._use_index(index)
        self._fit(train)

    def _use_index(self, index: ItemIndex) -> None:
        # Swapped as one reference: a call that took `self.index` at its start keeps using that index (its
        # vectors, its encoder version, its profiles) even if another thread switches the index meanwhile.
        self._profiles: dict[tuple[int, int], UserProfile] = {}  # interest vectors come from the index's vectors
        self.__dict__.pop("_user_matrix", None)
        self.index = index
        self.encoder = index.encoder

    def refresh_index(self) -> bool:
        """Switches to the store's current index if a rollout moved it; True when it did."""
        if self.index_store is None:
            return False
        name = self.index_store.current_name()
        if name is None or name == self.index_name:
            return False
        index = self.index_store.load(name)
        if not np.array_equal(index.item_ids, self.index.item_ids):
            raise ValueError(f"index {name} holds other items than the one this recommender was fitted on")
        self._use_index(index)
        self.index_name = name
        return True

    # ---- fitting (co-occurrence, popularity, user histories) ----------------------------------------
    def _fit(self, train: Interactions) -> None:
        s = self.settings
        self.item_ids = index_ids = self.index.item_ids
        self.column = {int(i): c for c, i in enumerate(index_ids)}
        positive = train.rating >= s.positive_rating
        pos = train.take(positive)
        self.popularity = np.bincount([self.column[int(i)] for i in pos.item], minlength=len(index_ids)).astype(np.float32)
        users = np.unique(train.user)
        self.user_row = {int(u): r for r, u in enumerate(users)}
        rows = np.array([self.user_row[int(u)] for u in pos.user], dtype=np.int64)
        cols = np.array([self.column[int(i)] for i in pos.item], dtype=np.int64)
        matrix = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), len(index_ids)))
        matrix.data[:] = 1.0
        counts = np.asarray(matrix.sum(axis=0)).ravel()
        norm = sparse.diags(1.0 / np.sqrt(np.maximum(counts, 1)))
        cooc = (matrix.T @ matrix).tocsr()
        cooc.setdiag(0)
        self.cooccurrence = (norm @ cooc @ norm).tocsr()  # cosine-normalised item-item co-occurrence
        self.histories: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        starts = np.flatnonzero(np.r_[True, train.user[1:] != train.user[:-1]])
        ends = np.r_[starts[1:], len(train)]
        for a, b in zip(starts, ends):
            self.histories[int(train.user[a])] = (train.item[a:b], train.rating[a:b], train.time[a:b])

    # ---- profiles ----------------------------------------------------------------------------------
    def profile(self, user_id: int, attributes: dict | None = None, index: ItemIndex | None = None) -> UserProfile:
        """Profiles depend only on the fitted histories and the index's vectors: computed once per user and index."""
        index = index or self.index
        key = (id(index), int(user_id))
        cached = self._profiles.get(key)
        if cached is None:
            cached = self._profiles[key] = self._build_profile(user_id, index)
        if attributes:
            return replace(cached, attributes=dict(attributes))
        return cached

    def _build_profile(self, user_id: int, index: ItemIndex) -> UserProfile:
        s = self.settings
        items, ratings, times = self.histories.get(int(user_id), (np.array([], dtype=np.int64),) * 3)
        known = np.array([index.has(i) for i in items], dtype=bool) if len(items) else np.array([], dtype=bool)
        items, ratings, times = items[known], ratings[known], times[known]
        liked_mask = ratings >= s.positive_rating
        liked, liked_times, liked_ratings = items[liked_mask], times[liked_mask], ratings[liked_mask]
        if len(liked) == 0:
            return UserProfile(int(user_id), items, liked, np.zeros(0), np.zeros((0, index.vectors.shape[1])),
                               np.zeros(0), [], [])
        age_days = (liked_times.max() - liked_times) / 86400.0
        weights = 0.5 ** (age_days / s.half_life_days) * (liked_ratings - s.positive_rating + 1.0)
        vectors = index.vectors_of(liked)
        k = min(s.max_interests, 1 + len(liked) // 10)
        interests, interest_weights = weighted_kmeans(vectors, weights, k)
        categories: Counter = Counter()
        words: Counter = Counter()
        for item_id, weight in zip(liked, weights):
            item = self.items[int(item_id)]
            for category in item.categories:
                categories[category] += weight
            title = re.sub(r"\(\d{4}\)", "", item.title.lower())
            words.update(w for w in re.findall(r"[a-z]{4,}", title) if w not in STOPWORDS)
        total = sum(categories.values()) or 1.0
        return UserProfile(int(user_id), items, liked, weights, interests, interest_weights,
                           [(c, w / total) for c, w in categories.most_common(6)],
                           [w for w, n in words.most_common(10) if n > 1])

    def similar_users(self, user_id: int, k: int = 10) -> list[tuple[int, float]]:
        """Top-k users by cosine of their mean interest vectors, centred on the population's mean (uncentred,
        every long history drifts towards the catalogue's centre and all users look alike)."""
        if not hasattr(self, "_user_matrix"):
            ids, vectors = [], []
            for uid in self.histories:
                mean = self.profile(uid).mean_vector
                if mean is not None:
                    ids.append(uid), vectors.append(mean)
            matrix = np.array(vectors, dtype=np.float32)
            self._user_centre = matrix.mean(axis=0)
            matrix -= self._user_centre
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
            self._user_ids, self._user_matrix = np.array(ids), matrix
        mean = self.profile(user_id).mean_vector
        if mean is None:
            return []
        centred = mean - self._user_centre
        scores = self._user_matrix @ (centred / max(np.linalg.norm(centred), 1e-12))
        order = [i for i in np.argsort(-scores) if self._user_ids[i] != user_id][:k]
        return [(int(self._user_ids[i]), float(scores[i])) for i in order]

    # ---- recall ------------------------------------------------------------------------------------
    def recall(self, profile: UserProfile, exclude: set[int], index: ItemIndex | None = None) -> dict[int, dict]:
        """-> {item id: {"channels": {channel: score}, "because": history item id or None}}."""
        s = self.settings
        index = index or self.index
        candidates: dict[int, dict] = {}

        def add(channel, ids, scores, because=None):
            taken = 0
            for item_id, score, cause in zip(ids, scores, because if because is not None else [None] * len(ids)):
                item_id = int(item_id)
                if item_id < 0 or item_id in exclude:
                    continue
                entry = candidates.setdefault(item_id, {"channels": {}, "because": None})
                if score > entry["channels"].get(channel, -np.inf):
                    entry["channels"][channel] = float(score)
                    if cause is not None and entry["because"] is None:
                        entry["because"] = int(cause)
                taken += 1
                if taken >= s.quotas[channel]:
                    break

        if not profile.is_cold:
            recent = profile.liked[-s.recent_items:]
            recent_weights = profile.liked_weights[-s.recent_items:]
            # Co-occurrence: items liked by the same users as the recent likes (training interactions only).
            cols = [self.column[int(i)] for i in recent]
            rows = self.cooccurrence[cols]
            contributions = rows.multiply(recent_weights[:, None]).tocsc()
            totals = np.asarray(contributions.sum(axis=0)).ravel()
            top = np.argsort(-totals)[: s.quotas["cooccurrence"] + len(exclude)]
            top = top[totals[top] > 0]
            # For each candidate, the recent like that contributed most: one sparse argmax, not a slice per item.
            cause = recent[np.asarray(contributions[:, top].argmax(axis=0)).ravel()] if len(top) else []
            add("cooccurrence", self.item_ids[top], totals[top], cause)
            # Item-to-item: content neighbours of the recent likes.
            ids, scores = index.search(index.vectors_of(recent), 20, index.encoder)
            flat = np.argsort(-scores.ravel())
            add("item2item", ids.ravel()[flat], scores.ravel()[flat], np.repeat(recent, ids.shape[1])[flat])
            # Semantic: the user's interest vectors against the whole catalog.
            k = s.quotas["semantic"] + len(exclude)
            ids, scores = index.search(profile.interests, k, index.encoder)
            weighted = scores * profile.interest_weights[:, None]
            flat = np.argsort(-weighted.ravel())
            add("semantic", ids.ravel()[flat], weighted.ravel()[flat])
        # Popularity: the fallback for cold start, and a prior for everyone.
        order = np.argsort(-self.popularity)
        pop = self.popularity[order]
        add("popularity", self.item_ids[order], np.log1p(pop) / max(np.log1p(pop[0]), 1e-12))
        return candidates

    # ---- scoring + assembly ------------------------------------------------------------------------
    def recommend(self, user_id: int, n: int = 10, blocked: set[int] = frozenset(), attributes: dict | None = None,
                  use_triton_score: bool = True, channels: tuple[str, ...] = CHANNELS, diversify: bool = True) -> tuple[UserProfile, list[dict]]:
        self.refresh_index()
        try:
            return self._recommend(self.index, user_id, n, blocked, attributes, use_triton_score, channels, diversify)
        except ModelNotFound:
            # The index's encoder version was retired while this call ran (a rollout promoted a newer one and
            # switched the store): follow the store once and start over with the new index.
            if not self.refresh_index():
                raise
            return self._recommend(self.index, user_id, n, blocked, attributes, use_triton_score, channels, diversify)

    def _recommend(self, index: ItemIndex, user_id, n, blocked, attributes, use_triton_score, channels, diversify):
        """One recommendation from one index: its vectors and its encoder version always go together."""
        s = self.settings
        profile = self.profile(user_id, attributes, index)
        exclude = set(int(i) for i in profile.history) | set(blocked)
        candidates = self.recall(profile, exclude, index)
        candidates = {i: c for i, c in candidates.items() if any(ch in c["channels"] for ch in channels)}
        if not candidates:
            return profile, []
        ids = np.array(list(candidates))
        vectors = index.vectors_of(ids)
        blend = np.zeros(len(ids), dtype=np.float32)
        for channel in channels:
            raw = np.array([candidates[i]["channels"].get(channel, np.nan) for i in ids], dtype=np.float32)
            present = ~np.isnan(raw)
            if present.any():
                low, high = np.nanmin(raw), np.nanmax(raw)
                norm = np.where(present, (raw - low) / (high - low) if high > low else 1.0, 0.0)
                blend += s.weights[channel] * norm
        profile_scores = np.zeros(len(ids), dtype=np.float32)
        if use_triton_score and not profile.is_cold:
            # The query is encoded by the version that embedded the candidates (score_v<N>), never another.
            result = self.client.score([profile.text(self.items)], vectors[None, :, :], outputs=["SCORES"],
                                       encoder_version=index.encoder_version)
            profile_scores = result["SCORES"][0]
            low, high = profile_scores.min(), profile_scores.max()
            blend += s.weights["profile"] * ((profile_scores - low) / (high - low) if high > low else 0.0)
        chosen = self._assemble(ids, vectors, blend, n, diversify)
        out = []
        for row in chosen:
            item_id = int(ids[row])
            entry = candidates[item_id]
            out.append({"item_id": item_id, "title": self.items[item_id].title,
                        "categories": self.items[item_id].categories, "score": float(blend[row]),
                        "profile_score": float(profile_scores[row]),
                        "why": self.explain(entry, profile)})
        return profile, out

    def _assemble(self, ids, vectors, scores, n, diversify) -> list[int]:
        """Greedy MMR with a per-category cap."""
        s = self.settings
        order = list(np.argsort(-scores)[: max(n * 10, 100)])
        if not diversify:
            return order[:n]
        chosen, per_category = [], Counter()
        while order and len(chosen) < n:
            if chosen:
                redundancy = (vectors[order] @ vectors[chosen].T).max(axis=1)
                mmr = s.mmr_lambda * scores[order] - (1 - s.mmr_lambda) * redundancy
            else:
                mmr = scores[order]
            for position in np.argsort(-mmr):
                row = order[position]
                categories = self.items[int(ids[row])].categories
                first = categories[0] if categories else ""
                if per_category[first] < s.category_cap:
                    break
            else:
                break  # every remaining item is over its category cap
            chosen.append(row)
            per_category[first] += 1
            order.remove(row)
        return chosen

    def explain(self, entry: dict, profile: UserProfile) -> str:
        channels = entry["channels"]
        because = entry["because"]
        parts = []
        if "cooccurrence" in channels and because is not None:
            parts.append(f"liked by people who liked {self.items[because].title}")
        elif "item2item" in channels and because is not None:
            parts.append(f"similar to {self.items[because].title}")
        if "semantic" in channels:
            top = ", ".join(c for c, _ in profile.top_categories[:2])
            parts.append(f"matches your interests ({top})")
        if "popularity" in channels and not parts:
            parts.append("popular right now" if profile.is_cold else "popular with everyone")
        return "; ".join(parts) or "recommended"

    # ---- personalised push -------------------------------------------------------------------------
    def push_targets(self, item_text: str, threshold: float = 0.5, max_users: int = 100,
                     pushes_so_far: dict[int, int] | None = None, per_user_cap: int = 3) -> list[tuple[int, float]]:
        """Users whose interests match a new item (embedded through Triton) above `threshold`, best first,
        skipping users who already got `per_user_cap` pushes."""
        index = self.index
        vector = self.client.embed([item_text], encoder_version=index.encoder_version)[0]
        pushes_so_far = pushes_so_far or {}
        matches = []
        for uid in self.histories:
            if pushes_so_far.get(uid, 0) >= per_user_cap:
                continue
            profile = self.profile(uid, index=index)
            if profile.is_cold:
                continue
            score = float((profile.interests @ vector).max())
            if score >= threshold:
                matches.append((uid, score))
        matches.sort(key=lambda m: -m[1])
        return matches[:max_users]
