"""The item cold-start and temporal evaluations (client.protocols), with the baselines, in one run on one split.

Systems scored on the item cold-start split (each test user ranks every hidden item):

    random, genres                      the floor, and category overlap
    tfidf <text>                        word overlap on the title text, the rich text, and the rich text with
                                        keywords (each text's n-grams and user representation chosen on validation)
    popularity                          training positives: zero for every hidden item (why CF cannot help here)
    <encoder> semantic / item2item      the recommender's content channels on that encoder's vectors: interest
                                        vectors (weighted k-means), and the mean of the 3 best similarities to the
                                        recent likes, which is also how new items are placed (`fresh_slots`)
    <encoder> profile                   Triton's `score`: the profile text against every hidden item's vector
    content                             how the recommender places new items (client.scorers.content_scores):
                                        "more like this" on the general encoder (centred) plus the taste term,
                                        from the recommendation encoder where one is served for the split, else
                                        from the general encoder

Encoders: the general one (`embed`), raw and centred on the visible items, and the recommendation encoder
(`rec_embed`) where a version trained for that very split is served (its `trained_split` parameter): an encoder
that has seen the hidden items' interactions is never used on them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bert_recsys import logs
from bert_recsys.client.catalog import Catalog
from bert_recsys.client.protocols import (ItemHoldout, TemporalSplit, item_holdout, pool, rank_metrics, summarise, temporal_split)
from bert_recsys.client.recall import RecallChannel
from bert_recsys.client.scorers import (ContentScorer, GenreScorer, PopularityScorer, RandomScorer, Scorer, TfidfScorer, UserHistory,
                            VectorScorer, centred, histories, rank)

log = logs.get("client")
C = RecallChannel

# Chosen on the validation split of seed 0 (docs/client.md, "Cold start: what was chosen where"), not on the test.
TFIDF = {"title": dict(representation="mean", ngrams=2), "rich": dict(representation="maxsim", m=3, ngrams=1),
         "rich-keywords": dict(representation="maxsim", m=3, ngrams=2)}
ITEM2ITEM_M = 3          # item-to-item: the mean of the m best similarities to the recent likes
RECENT = 20              # the recommender's recent likes (RecommenderSettings.recent_items)


@dataclass
class EncodedCatalog:
    """One encoder's vectors for the whole catalog, in catalog order, and what made them."""

    name: str                     # how the report calls it: "base", "fine-tuned"
    vectors: np.ndarray           # raw: L2-normalised, as `embed` returns them
    encoder: dict                 # the encoder's export parameters (variant, manifest hash, trained split...)
    profile_score: Callable | None = None   # (profile text, candidate vectors [n, D]) -> cosines, through Triton
    centre: bool = True           # also report it centred on the visible items (the served index's setting)


def content_scorers(encoded: EncodedCatalog, item_ids: np.ndarray, visible_rows: np.ndarray) -> list[Scorer]:
    """The recommender's content channels on one encoder, raw and (where asked) centred."""
    out = []
    spaces = [("", encoded.vectors)]
    if encoded.centre:
        spaces.append((" centred", centred(encoded.vectors, visible_rows)))
    for label, vectors in spaces:
        out += [VectorScorer(f"{encoded.name}{label} {C.SEMANTIC.value}", item_ids, vectors, "interests"),
                VectorScorer(f"{encoded.name}{label} {C.ITEM2ITEM.value}", item_ids, vectors, "maxsim", ITEM2ITEM_M,
                             recent=RECENT)]
    return out


@dataclass
class ProfileScorer:
    """Triton's `score` ensemble: the profile's text (recent liked titles, favourite categories) against the
    candidates' vectors, as the recommender's profile score."""

    name: str
    item_ids: np.ndarray
    vectors: np.ndarray
    titles: dict[int, str]
    categories: dict[int, tuple[str, ...]]
    score_fn: Callable

    def __post_init__(self):
        self._row = {int(i): r for r, i in enumerate(self.item_ids)}

    def text(self, user: UserHistory) -> str:
        from collections import Counter

        liked = user.liked[::-1][:8]
        counts = Counter(c for i in user.liked for c in self.categories[int(i)])
        return (f"Liked: {'; '.join(self.titles[int(i)] for i in liked)}. "
                f"Favourite genres: {', '.join(c for c, _ in counts.most_common(4))}")

    def score(self, user: UserHistory, candidates: np.ndarray) -> np.ndarray:
        rows = [self._row[int(i)] for i in candidates]
        return np.asarray(self.score_fn(self.text(user), self.vectors[rows]))


def lexical_scorers(catalog: Catalog, item_ids: np.ndarray, texts: dict[str, list[str]], fit_ids) -> list[Scorer]:
    return [TfidfScorer(f"tfidf {name}", item_ids, texts[name], fit_ids, **TFIDF[name]) for name in TFIDF if name in texts]


def score_users(scorer: Scorer, users: dict[int, UserHistory], truth: dict[int, set[int]], candidates: np.ndarray,
                max_users: int | None = None) -> dict:
    ids = sorted(truth)[:max_users] if max_users else sorted(truth)
    return summarise([rank_metrics(rank(scorer, users[u], candidates), truth[u]) for u in ids])


def item_cold_start(catalog: Catalog, encoded: list[EncodedCatalog], texts: dict[str, list[str]], seeds: tuple[int, ...],
                    fine_tuned: dict[int, EncodedCatalog] | None = None, max_users: int | None = None) -> dict:
    """Every system on every seed's split, then pooled over the seeds. `fine_tuned[seed]` is the recommendation
    encoder trained without that seed's hidden items, where one is served."""
    item_ids = np.array([item.item_id for item in catalog.items], dtype=np.int64)
    titles = {item.item_id: item.title for item in catalog.items}
    categories = {item.item_id: item.categories for item in catalog.items}
    per_system: dict[str, list[dict]] = {}
    splits = []
    for seed in seeds:
        started = time.perf_counter()
        split = item_holdout(item_ids, catalog.interactions, ItemHoldout(seed=seed))
        splits.append(split.describe())
        visible = np.setdiff1d(item_ids, split.hidden)
        visible_rows = np.flatnonzero(np.isin(item_ids, visible))
        users = histories(split.train)
        popularity = split.train.take(split.train.rating >= split.spec.positive)
        counts = dict(zip(*np.unique(popularity.item, return_counts=True)))
        scorers: list[Scorer] = [RandomScorer(seed), GenreScorer(catalog.items),
                                 *lexical_scorers(catalog, item_ids, texts, visible),
                                 PopularityScorer({int(k): float(v) for k, v in counts.items()})]
        tuned = fine_tuned.get(seed) if fine_tuned else None
        for enc in encoded + ([tuned] if tuned else []):
            scorers += content_scorers(enc, item_ids, visible_rows)
            if enc.profile_score is not None:
                space = centred(enc.vectors, visible_rows) if enc.centre else enc.vectors
                scorers.append(ProfileScorer(f"{enc.name}{' centred' if enc.centre else ''} profile", item_ids, space,
                                             titles, categories, enc.profile_score))
        scorers += served_content(encoded[0], tuned, item_ids, visible_rows)
        for scorer in scorers:
            per_system.setdefault(scorer.name, []).append(
                score_users(scorer, users, split.truth, split.hidden, max_users) | {"seed": seed})
        log.info("item cold start, seed %d: %d hidden items, %d test users, %d systems in %.0f s", seed,
                 len(split.hidden), len(split.truth), len(scorers), time.perf_counter() - started)
    systems = {name: {"pooled": pool(runs), "per_seed": runs} for name, runs in per_system.items()}
    return {"protocol": "item cold start", "seeds": list(seeds), "splits": splits, "systems": systems,
            "headline": headline(systems)}


BASE_CONTENT, SERVED_CONTENT = "content: base (+ base taste)", "content: base + fine-tuned taste"


def served_content(base: EncodedCatalog, tuned: EncodedCatalog | None, item_ids: np.ndarray,
                   visible_rows: np.ndarray) -> list[Scorer]:
    """How the recommender places a new item: with the general encoder in both roles (no recommendation encoder
    served), and with the recommendation encoder's taste term (all centred on the visible items)."""
    similar = centred(base.vectors, visible_rows)
    out: list[Scorer] = [ContentScorer(BASE_CONTENT, item_ids, similar, similar)]
    if tuned is not None:
        out.append(ContentScorer(SERVED_CONTENT, item_ids, similar, centred(tuned.vectors, visible_rows)))
    return out


def headline(systems: dict) -> dict:
    """What the recommender serves for new items (with the recommendation encoder where there is one) against
    the best word-overlap baseline and random, nDCG@10 pooled over the seeds. The best lexical system is taken
    on the test split itself: the strictest comparison for the encoder."""
    ndcg = {name: s["pooled"]["ndcg@10"] for name, s in systems.items()}
    lexical = max((n for n in ndcg if n.startswith("tfidf")), key=ndcg.get, default=None)
    served = SERVED_CONTENT if SERVED_CONTENT in ndcg else BASE_CONTENT
    if served not in ndcg or lexical is None:
        return {}
    return {"metric": "ndcg@10", "served": served, "value": ndcg[served], "best_lexical": lexical,
            "lexical_value": ndcg[lexical], "vs_lexical": ndcg[served] / ndcg[lexical], "random": ndcg.get("random"),
            "vs_random": ndcg[served] / ndcg["random"] if ndcg.get("random") else None,
            "seeds_with_fine_tuned": len(systems.get(SERVED_CONTENT, {}).get("per_seed", []))}


def temporal(catalog: Catalog, encoded: list[EncodedCatalog], texts: dict[str, list[str]],
             fine_tuned: EncodedCatalog | None = None, max_users: int | None = None) -> dict:
    """Secondary: one global cutoff; cold items (ranked among the items new after the cutoff), then popularity
    for cold users. Warm items after the cutoff are the recommender's (client.evaluate adds them)."""
    item_ids = np.array([item.item_id for item in catalog.items], dtype=np.int64)
    created = {item.item_id: item.created_at for item in catalog.items if item.created_at is not None}
    split: TemporalSplit = temporal_split(catalog.interactions, created_at=created or None)
    for warning in split.warnings():
        log.warning(warning)
    users = histories(split.train)
    visible_rows = np.flatnonzero(~np.isin(item_ids, split.cold_item_ids))
    result = {"protocol": "temporal", "cutoff": split.cutoff, "populations": split.populations(),
              "warnings": split.warnings(), "segments": {}}
    if split.cold_items and len(split.cold_item_ids):
        scorers: list[Scorer] = [RandomScorer(0), GenreScorer(catalog.items),
                                 *lexical_scorers(catalog, item_ids, texts, item_ids[visible_rows])]
        for enc in encoded + ([fine_tuned] if fine_tuned else []):
            scorers += content_scorers(enc, item_ids, visible_rows)
        result["segments"]["cold_items"] = {
            s.name: score_users(s, users, split.cold_items, split.cold_item_ids, max_users) for s in scorers}
    if split.cold_users:
        positives = split.train.take(split.train.rating >= 4.0)
        counts = dict(zip(*np.unique(positives.item, return_counts=True)))
        ranked = np.array(sorted(counts, key=lambda i: (-counts[i], i)), dtype=np.int64)[:50]
        result["segments"]["cold_users"] = {C.POPULARITY.value: summarise(
            [rank_metrics(ranked, truth) for truth in split.cold_users.values()])}
    return result | {"split": split}
