"""A recommendation, end to end: everything outside Triton, plus the one call that goes to it.

    history ──profile──▶ interest vectors + top categories                        (client/profiles.py)
            ──recall───▶ channels (co-occurrence, item-to-item, semantic, popularity), merged with quotas
                                                                                   (client/recall.py)
            ──score────▶ Triton `score` ensemble: the profile's text against every candidate's vector
            ──assemble─▶ filter seen/blocked, blend, MMR diversity, per-category cap, explanations
                                                                                   (client/ranking.py)

Only the `score` step (and catalog embedding) calls Triton; all of it goes through `client.triton`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Sequence
from weakref import WeakKeyDictionary

import numpy as np

from bert_recsys import logs
from bert_recsys.client import ranking
from bert_recsys.client.catalog import Interactions, Item
from bert_recsys.client.errors import ModelNotFound, ServingError
from bert_recsys.client.index import ItemIndex, TemplateMismatch
from bert_recsys.client.item_text import TextTemplate, by_identity
from bert_recsys.client.profiles import ProfileCache, ProfileSettings, UserProfile, build_profile
from bert_recsys.client.recall import (ALL_CHANNELS, EASE_LAMBDA, EASE_MAX_ITEMS, Candidate, InteractionModel, RecallChannel, Seeds,
                           default_channels, recall)
from bert_recsys.client.scorers import content_scores

log = logs.get("client")
CHANNELS = tuple(c.value for c in ALL_CHANNELS)  # the names, for callers that pass strings
__all__ = ["Recommender", "RecommenderSettings", "UserProfile", "RecallChannel", "CHANNELS"]


@dataclass(frozen=True)
class RecommenderSettings:
    positive_rating: float = 4.0
    half_life_days: float = 365.0     # recency decay of history items, relative to the user's last action
    max_interests: int = 3            # interest vectors per user (weighted k-means over liked items)
    recent_items: int = 20            # history items that seed item-to-item and co-occurrence recall
    quotas: dict = field(default_factory=lambda: {RecallChannel.COOCCURRENCE: 300, RecallChannel.ITEM2ITEM: 100,
                                                  RecallChannel.SEMANTIC: 100, RecallChannel.POPULARITY: 100})
    # Final blend of per-channel scores (each min-max normalised per user) and Triton's profile score. Chosen on
    # the warm protocol's inner time split of ml-latest-small (the history part's own last 20%; 590 users, the
    # base encoder; `weights` and `profile_weight` on a grid): recall@10 0.1311, against 0.1213 for EASE^R alone
    # and 0.1260 for the weights used before (1, 0.15, 0.15, 0.3; 0.2). Popularity still recalls (cold users,
    # ties) but adds nothing to the blend: EASE^R's scores already carry it.
    weights: dict = field(default_factory=lambda: {RecallChannel.COOCCURRENCE: 1.0, RecallChannel.ITEM2ITEM: 0.15,
                                                   RecallChannel.SEMANTIC: 0.15, RecallChannel.POPULARITY: 0.0})
    profile_weight: float = 0.4
    mmr_lambda: float = 0.9           # 1 = pure relevance, 0 = pure diversity
    category_cap: int = 5             # at most this many items sharing a first category in one list
    # New items (no interaction yet) cannot compete on co-occurrence or popularity: up to `fresh_slots` of a list
    # go to the new items with the best content score (client.scorers.content_scores: "more like this" from the
    # catalog index, plus taste from the recommendation encoder's index where there is one), at least
    # `fresh_min_score`, explained by the liked item they resemble most.
    fresh_slots: int = 1
    fresh_min_score: float = 0.3
    # Collaborative filtering: EASE^R's item-item weights over all the user's likes (client.recall.ease_weights)
    # for catalogs up to `ease_max_items`; None (or a larger catalog): cosine co-occurrence of the recent likes.
    ease_lambda: float | None = EASE_LAMBDA
    ease_max_items: int = EASE_MAX_ITEMS
    # The ranker sees every channel's score for every candidate (each channel scores the others' proposals too),
    # not only for the candidates that channel proposed; False: the proposing channels' scores only.
    score_every_candidate: bool = True

    def __post_init__(self):
        for name in ("quotas", "weights"):
            given = getattr(self, name)
            missing = set(RecallChannel) - set(given)
            if missing or set(given) - set(RecallChannel):
                raise ValueError(f"{name} must have exactly one entry per recall channel {[c.value for c in RecallChannel]}")
            object.__setattr__(self, name, {RecallChannel(k): v for k, v in given.items()})
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda must be within [0, 1], not {self.mmr_lambda}")
        if self.fresh_slots < 0:
            raise ValueError(f"fresh_slots must be >= 0, not {self.fresh_slots}")

    @property
    def profiles(self) -> ProfileSettings:
        return ProfileSettings(self.positive_rating, self.half_life_days, self.max_interests)


@dataclass
class TasteIndex:
    """The recommendation encoder's catalog index (`rec_embed`, training.finetune) and the client that embeds
    with it: the semantic channel's interest vectors and the taste of new items come from it."""

    index: ItemIndex
    client: object


class Recommender:
    """Fitted on interactions (never on evaluated positives); serves any user through Triton.

    `index` is the catalog embedded by the general encoder (`embed`): item-to-item recall ("more like this"),
    Triton's profile score, diversity. With `taste`, the recommendation encoder's index holds the users' interest
    vectors (the semantic channel) and the taste term of new items; without it, `index` serves those too."""

    def __init__(self, items: list[Item], index: ItemIndex, train: Interactions, client,
                 settings: RecommenderSettings = RecommenderSettings(), index_store=None,
                 taste: TasteIndex | None = None):
        self.items = {item.item_id: item for item in items}
        self.client = client
        self.settings = settings
        self.taste = taste
        if taste is not None and not np.array_equal(np.sort(taste.index.item_ids), np.sort(index.item_ids)):
            raise ValueError("the taste index holds other items than the catalog index")
        self.fitted = InteractionModel.fit(train, index.item_ids, settings.positive_rating, settings.ease_lambda,
                                           settings.ease_max_items)
        self.channels = default_channels(self.fitted)
        # With an IndexStore, the index follows the store's `current` link (a rollout switches it).
        self.index_store = index_store
        self.index_name = index_store.current_name() if index_store is not None else None
        # Held while an item is added and while the index is switched, so an item added live is never lost between
        # the old index and the new one.
        self._switching = threading.RLock()
        self._use_index(index)

    # ---- new items, live --------------------------------------------------------------------------------
    @property
    def template(self) -> TextTemplate | None:
        """The item text template the index was embedded from (client.item_text), if it is a known one."""
        return by_identity(self.index.template)

    def add_item(self, item: Item, template: TextTemplate | None = None) -> np.ndarray:
        """A new item, live: its text (rendered by the index's template) is embedded through Triton by the index's
        encoder version and added to the index, with no rebuild and no restart. It has no interactions, so it is
        recommended on its text alone (`fresh_slots`). Returns its vector in the index's space."""
        with self._switching:
            index = self.index
            chosen = template or self.template
            if chosen is None:
                raise TemplateMismatch(f"the index was embedded from template {index.template!r}, which is not a "
                                       "built-in one: pass the TextTemplate it was built with")
            index.check_template(chosen.identity)
            if int(item.item_id) in self.items or index.has(item.item_id):
                raise ValueError(f"item {item.item_id} is already in the catalog")
            text = chosen.render(item)
            vector = self.client.embed([text], encoder_version=index.encoder_version)
            if self.taste is not None:
                self.taste.index.check_template(chosen.identity)
                taste = self.taste.client.embed([text], encoder_version=self.taste.index.encoder_version)
                self.taste.index.add([int(item.item_id)], taste, [text] if self.taste.index.texts is not None else None)
            index.add([int(item.item_id)], vector, [text] if index.texts is not None else None)
            self.items[int(item.item_id)] = item
            self._new_items.clear()
            return index.vectors_of([item.item_id])[0]

    def is_new(self, item_id: int) -> bool:
        """True for an item with no training interaction (added live, or not yet interacted with)."""
        column = self.fitted.column.get(int(item_id))
        return column is None or not self.fitted.interacted[column]

    def new_items(self, index: ItemIndex) -> np.ndarray:
        """Ids of the index's items with no training interaction (cached per index until an item is added)."""
        cached = self._new_items.get(index)
        if cached is None or cached[0] != len(index):  # items adopted into it since
            ids = np.array([i for i in index.item_ids.tolist() if self.is_new(i)], dtype=np.int64)
            cached = self._new_items[index] = (len(index), ids)
        return cached[1]

    # What the fitted interactions hold, for callers (evaluation, load tests).
    @property
    def item_ids(self) -> np.ndarray:
        return self.fitted.item_ids

    @property
    def popularity(self) -> np.ndarray:
        return self.fitted.popularity

    @property
    def histories(self) -> dict:
        return self.fitted.histories

    # ---- the index and the profiles computed from it --------------------------------------------------
    def _use_index(self, index: ItemIndex) -> None:
        # Swapped as one reference: a call that took `self.index` at its start keeps using that index (its
        # vectors, its encoder version, its profiles) even if another thread switches the index meanwhile.
        self.profiles = ProfileCache(self.fitted.histories, self.items, self.settings.profiles)
        self._similar_users = None
        self._new_items: WeakKeyDictionary[ItemIndex, tuple[int, np.ndarray]] = WeakKeyDictionary()
        self.index = index
        self.encoder = index.encoder

    def refresh_index(self, wait: bool = True) -> bool:
        """Switches to the store's current index if a rollout moved it; True when it did. One thread switches;
        with `wait=False` the others go on with the index they have (it stays valid while the old version drains)."""
        if self.index_store is None:
            return False
        name = self.index_store.current_name()
        if name is None or name == self.index_name:
            return False
        if not self._switching.acquire(blocking=wait):
            return False
        try:
            if self.index_name == name:  # switched by another thread meanwhile
                return True
            self._use_index(self.adopt(self.index_store.load(name)))
            self.index_name = name
            return True
        finally:
            self._switching.release()

    def adopt(self, index: ItemIndex) -> ItemIndex:
        """`index` (another encoder version's, from the store) made to hold this recommender's catalog: the items
        added live since it was embedded (`add_item`) are embedded by its own version, from its own template, and
        added to it. An index holding items this recommender does not know is refused (ValueError). Returns it."""
        unknown = [i for i in index.item_ids.tolist() if i not in self.items]
        if unknown:
            raise ValueError(f"the index holds {len(unknown)} items this recommender does not know, e.g. {unknown[:5]}")
        missing = [i for i in self.index.item_ids.tolist() if not index.has(i)]
        if missing:
            chosen = by_identity(index.template)
            if chosen is None:
                raise TemplateMismatch(f"the index was embedded from template {index.template!r}, which is not a "
                                       f"built-in one: the {len(missing)} items added live cannot be embedded into it")
            texts = [chosen.render(self.items[i]) for i in missing]
            vectors = self.client.embed_many(texts, encoder_version=index.encoder_version)
            index.add(missing, vectors, texts if index.texts is not None else None)
        return index

    def profile(self, user_id: int, attributes: dict | None = None, index: ItemIndex | None = None,
                history: Sequence[int] | None = None) -> UserProfile:
        """A known user's profile (cached), or, with `history` (item ids, oldest first, all taken as liked), a
        profile built from that history alone for a user the fitted data does not know (not cached)."""
        index = self.interest_index(index or self.index)
        if history is not None and int(user_id) not in self.histories:
            ids = np.array([int(i) for i in history if int(i) in self.items], dtype=np.int64)
            liked = (ids, np.full(len(ids), 5.0, dtype=np.float32), np.arange(len(ids), dtype=np.int64) * 86400)
            profile = build_profile(user_id, liked, index, self.items, self.settings.profiles)
            return replace(profile, attributes=dict(attributes)) if attributes else profile
        return self.profiles.get(user_id, index, attributes)

    def interest_index(self, index: ItemIndex) -> ItemIndex:
        """Where the users' interest vectors live: the taste index where there is one, else `index`."""
        return self.taste.index if self.taste is not None else index

    def similar_users(self, user_id: int, k: int = 10) -> list[tuple[int, float]]:
        """Top-k users by cosine of their mean interest vectors, centred on the population's mean (uncentred,
        every long history drifts towards the catalogue's centre and all users look alike)."""
        if self._similar_users is None:
            ids, vectors = [], []
            for uid in self.histories:
                mean = self.profile(uid).mean_vector
                if mean is not None:
                    ids.append(uid), vectors.append(mean)
            matrix = np.array(vectors, dtype=np.float32)
            centre = matrix.mean(axis=0)
            matrix -= centre
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
            self._similar_users = (np.array(ids), matrix, centre)
        user_ids, matrix, centre = self._similar_users
        mean = self.profile(user_id).mean_vector
        if mean is None:
            return []
        centred = mean - centre
        scores = matrix @ (centred / max(np.linalg.norm(centred), 1e-12))
        order = [i for i in np.argsort(-scores) if user_ids[i] != user_id][:k]
        return [(int(user_ids[i]), float(scores[i])) for i in order]

    # ---- recall ------------------------------------------------------------------------------------
    def seeds(self, profile: UserProfile) -> Seeds:
        n = self.settings.recent_items
        return Seeds(profile.liked[-n:], profile.liked_weights[-n:], profile.interests, profile.interest_weights,
                     self.taste.index if self.taste is not None else None, profile.liked)

    def recall(self, profile: UserProfile, exclude: set[int], index: ItemIndex | None = None):
        """-> {item id: Candidate} from every channel, up to each channel's quota."""
        pool = recall(self.channels, self.seeds(profile), index or self.index, exclude, self.settings.quotas)
        return pool.candidates

    # ---- scoring + assembly ------------------------------------------------------------------------
    def recommend(self, user_id: int, n: int = 10, blocked: set[int] = frozenset(), attributes: dict | None = None,
                  use_triton_score: bool = True, channels: Sequence[str] = CHANNELS, diversify: bool = True,
                  history: Sequence[int] | None = None, weights: dict | None = None,
                  index: ItemIndex | None = None) -> tuple[UserProfile, list[dict]]:
        """-> (profile, [{item_id, title, categories, score, profile_score, why}]), best first. `history` serves
        a user the fitted data does not know (see `profile`). `weights` replaces the settings' channel blend
        weights for this call; `index` serves from that index (and its encoder version) instead of the current
        one (an experiment arm pinned to another encoder version)."""
        channels = RecallChannel.parse_many(channels)
        weights = {RecallChannel(k): v for k, v in weights.items()} if weights is not None else self.settings.weights
        args = (user_id, n, blocked, attributes, use_triton_score, channels, diversify, history, weights)
        if index is not None:
            return self._recommend(index, *args)
        try:
            self.refresh_index(wait=False)
        except ServingError as error:  # items added live could not be embedded by the new version yet
            log.warning("catalog index not switched yet, still serving %s: %s", self.index_name, error)
        try:
            return self._recommend(self.index, *args)
        except ModelNotFound:
            # The index's encoder version was retired while this call ran (a rollout promoted a newer one and
            # switched the store): follow the store once and start over with the new index.
            if not self.refresh_index():
                raise
            return self._recommend(self.index, *args)

    def _recommend(self, index: ItemIndex, user_id, n, blocked, attributes, use_triton_score, channels, diversify,
                   history, weights):
        """One recommendation from one index: its vectors and its encoder version always go together."""
        s = self.settings
        profile = self.profile(user_id, attributes, index, history)
        exclude = set(int(i) for i in profile.history) | set(blocked)
        seeds = self.seeds(profile)
        candidates = list(recall(self.channels, seeds, index, exclude, s.quotas).using(channels).values())
        content = RecallChannel.ITEM2ITEM in channels or RecallChannel.SEMANTIC in channels
        fresh_candidates = self._fresh(profile, index, exclude) if content else []
        known = {c.item_id: row for row, c in enumerate(candidates)}
        for candidate in fresh_candidates:
            if candidate.item_id not in known:
                known[candidate.item_id] = len(candidates)
                candidates.append(candidate)
        fresh = [known[c.item_id] for c in fresh_candidates]
        if not candidates:
            return profile, []
        ids = np.array([c.item_id for c in candidates])
        vectors = index.vectors_of(ids)
        if s.score_every_candidate:
            for channel in channels:
                ranking.fill_scores(candidates, channel, self.channels[channel].score(seeds, index, ids))
        scores = ranking.blend(candidates, channels, weights)
        profile_scores = np.zeros(len(ids), dtype=np.float32)
        if use_triton_score and not profile.is_cold:
            profile_scores = self._profile_scores(profile, vectors, index)
            low, high = profile_scores.min(), profile_scores.max()
            scores += s.profile_weight * ((profile_scores - low) / (high - low) if high > low else 0.0)
        if diversify:
            chosen = ranking.mmr(vectors, scores, n, lambda row: self._first_category(int(ids[row])), s.mmr_lambda,
                                 s.category_cap)
        else:
            chosen = list(np.argsort(-scores, kind="stable")[:n])
        chosen = ranking.with_fresh(chosen, fresh, n)
        title = lambda item_id: self.items[item_id].title  # noqa: E731
        return profile, [{"item_id": int(ids[row]), "title": self.items[int(ids[row])].title,
                          "categories": self.items[int(ids[row])].categories, "score": float(scores[row]),
                          "profile_score": float(profile_scores[row]), "new": row in fresh,
                          "why": ranking.explain(candidates[row], profile, title, new=row in fresh)} for row in chosen]

    def _fresh(self, profile: UserProfile, index: ItemIndex, exclude: set[int]) -> list[Candidate]:
        """The new items (no interactions) to place in the list, best first: every one is scored by
        client.scorers.content_scores against all the user's likes, and the best `fresh_slots` of at least
        `fresh_min_score` are kept, each with the liked item it resembles most."""
        s = self.settings
        if not s.fresh_slots or profile.is_cold:
            return []
        new = np.array([i for i in self.new_items(index).tolist() if i not in exclude], dtype=np.int64)
        if not len(new):
            return []
        liked = profile.liked
        similar, liked_vectors = index.vectors_of(new), index.vectors_of(liked)
        # Taste from the recommendation encoder where there is one, else from the catalog index's own vectors.
        taste = ((self.taste.index.vectors_of(new), self.taste.index.vectors_of(liked)) if self.taste is not None
                 else (similar, liked_vectors))
        scores = content_scores(similar, liked_vectors, *taste)
        best = [row for row in np.argsort(-scores, kind="stable")[: s.fresh_slots] if scores[row] >= s.fresh_min_score]
        out = []
        for row in best:
            cause = int(liked[int(np.argmax(liked_vectors @ similar[row]))])
            out.append(Candidate(int(new[row]), {RecallChannel.ITEM2ITEM: float(scores[row])}, because=cause))
        return out

    def _profile_scores(self, profile: UserProfile, vectors: np.ndarray, index: ItemIndex) -> np.ndarray:
        """Triton's `score`: the profile's text against every candidate's vector, encoded by the version that
        embedded the candidates (score_v<N>), never another."""
        scores = self.client.settings.tensors.scores
        result = self.client.score([profile.text(self.items)], vectors[None, :, :], outputs=[scores],
                                   encoder_version=index.encoder_version)
        return result[scores][0]

    def _first_category(self, item_id: int) -> str:
        categories = self.items[item_id].categories
        return categories[0] if categories else ""

    # ---- personalised push -------------------------------------------------------------------------
    def push_targets(self, item_text: str, threshold: float = 0.5, max_users: int = 100,
                     pushes_so_far: dict[int, int] | None = None, per_user_cap: int = 3) -> list[tuple[int, float]]:
        """Users whose interests match a new item (embedded through Triton) above `threshold`, best first,
        skipping users who already got `per_user_cap` pushes."""
        index, client = (self.taste.index, self.taste.client) if self.taste is not None else (self.index, self.client)
        vector = index.transform(client.embed([item_text], encoder_version=index.encoder_version))[0]
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
