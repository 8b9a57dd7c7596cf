"""Recall, assembly, MMR and explanations, without a server: a small synthetic catalog, real faiss, and a
stand-in for Triton's `score` that answers from the same vectors."""
from __future__ import annotations

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.client.catalog import Interactions, Item
from bert_recsys.client.index import ItemIndex
from bert_recsys.client.profiles import UserProfile
from bert_recsys.client.ranking import blend, explain, min_max, mmr
from bert_recsys.client.recall import Candidate, CandidatePool, Proposals, RecallChannel
from bert_recsys.client.recommend import Recommender, RecommenderSettings

C = RecallChannel
ENCODER = {"export_version": "1", "export_variant": "onnx-int8", "export_manifest_sha256": "a" * 64}
GENRES = ("Drama", "Comedy", "Horror", "Sci-Fi")


def catalog(n_items=60, dim=16, seed=0):
    """Items in four genres; vectors cluster by genre, so content channels have something to find."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(GENRES), dim))
    items, vectors = [], []
    for i in range(n_items):
        genre = i % len(GENRES)
        items.append(Item(100 + i, f"Film {i} ({1990 + i % 30})", (GENRES[genre],)))
        vectors.append(centres[genre] + 0.3 * rng.normal(size=dim))
    vectors = np.array(vectors, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return items, ItemIndex(np.array([it.item_id for it in items]), vectors, ENCODER)


def interactions(users=12, per_user=10, seed=1):
    """Users who each like one genre (rating 5) and dislike a few others (rating 2), in time order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        genre = u % len(GENRES)
        liked = [100 + i for i in range(60) if i % len(GENRES) == genre]
        other = [100 + i for i in range(60) if i % len(GENRES) != genre]
        chosen = list(rng.choice(liked, per_user - 2, replace=False)) + list(rng.choice(other, 2, replace=False))
        for t, item in enumerate(chosen):
            rows.append((u + 1, item, 5.0 if item in liked else 2.0, 1_000_000 + 86400 * t))
    user, item, rating, time = (np.array(col) for col in zip(*rows))
    return Interactions(user.astype(np.int64), item.astype(np.int64), rating.astype(np.float32), time.astype(np.int64))


class FakeScoreClient:
    """Answers `score` with the cosine of the candidates to a fixed query vector; records the calls."""

    settings = settings.SETTINGS

    def __init__(self, query):
        self.query, self.calls = query, []

    def score(self, texts, candidates, outputs=None, encoder_version=None):
        self.calls.append((texts, encoder_version))
        return {self.settings.tensors.scores: candidates @ self.query}


@pytest.fixture(scope="module")
def world():
    items, index = catalog()
    client = FakeScoreClient(index.vectors[0])
    return items, index, Recommender(items, index, interactions(), client), client


def test_the_pool_honours_quotas_exclusions_and_keeps_the_best_score_and_first_cause():
    pool = CandidatePool(exclude={2})
    taken = pool.add(C.ITEM2ITEM, Proposals(np.array([1, 2, 3, 4, -1]), np.array([0.9, 0.8, 0.7, 0.6, 0.5]),
                                            np.array([10, 11, 12, 13, 14])), quota=2)
    assert taken == 2 and set(pool.candidates) == {1, 3}  # 2 is excluded, the quota stops at 3
    pool.add(C.ITEM2ITEM, Proposals(np.array([1]), np.array([0.95]), np.array([99])), quota=5)
    assert pool.candidates[1].scores[C.ITEM2ITEM] == 0.95 and pool.candidates[1].because == 10
    pool.add(C.POPULARITY, Proposals(np.array([5]), np.array([1.0])), quota=5)
    assert set(pool.using([C.POPULARITY])) == {5} and set(pool.using([C.ITEM2ITEM, C.POPULARITY])) == {1, 3, 5}


def test_blend_normalises_each_channel_and_ignores_the_ones_left_out():
    a = Candidate(1, {C.COOCCURRENCE: 10.0, C.POPULARITY: 0.5})
    b = Candidate(2, {C.COOCCURRENCE: 20.0})
    c = Candidate(3, {C.POPULARITY: 0.9})
    weights = {C.COOCCURRENCE: 1.0, C.ITEM2ITEM: 0.15, C.SEMANTIC: 0.15, C.POPULARITY: 0.3}
    scores = blend([a, b, c], [C.COOCCURRENCE, C.POPULARITY], weights)
    assert scores.tolist() == pytest.approx([0.0 + 0.0, 1.0, 0.3])  # min-max per channel, absent = 0
    assert blend([a, b, c], [C.COOCCURRENCE], weights).tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert min_max(np.array([2.0, 2.0, np.nan])).tolist() == [1.0, 1.0, 0.0]
    # Popularity weighs 0 by default, yet a user only popularity can serve is still ranked by it.
    only_popular = [Candidate(1, {C.POPULARITY: 0.2}), Candidate(2, {C.POPULARITY: 0.9})]
    assert RecommenderSettings().weights[C.POPULARITY] == 0.0
    assert blend(only_popular, list(C), RecommenderSettings().weights).tolist() == pytest.approx([0.0, 1.0])


def test_mmr_trades_relevance_for_diversity_and_caps_categories():
    vectors = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.98, 0.2]], dtype=np.float32)
    scores = np.array([1.0, 0.95, 0.5, 0.9], dtype=np.float32)
    same = lambda row: "A"  # noqa: E731
    assert mmr(vectors, scores, 3, same, mmr_lambda=1.0, category_cap=10) == [0, 1, 3]   # pure relevance
    assert mmr(vectors, scores, 2, same, mmr_lambda=0.3, category_cap=10) == [0, 2]      # the distinct one second
    assert mmr(vectors, scores, 3, same, mmr_lambda=1.0, category_cap=2) == [0, 1]       # the cap ends the list


def test_explanations_name_the_channel_and_the_history_item():
    profile = UserProfile(7, np.array([1]), np.array([1]), np.ones(1), np.ones((1, 2)), np.ones(1),
                          [("Drama", 0.7), ("Comedy", 0.3)], [])
    title = {1: "Heat (1995)", 2: "Alien (1979)"}.get
    assert explain(Candidate(5, {C.COOCCURRENCE: 1.0}, because=1), profile, title) == "liked by people who liked Heat (1995)"
    assert explain(Candidate(5, {C.ITEM2ITEM: 1.0, C.SEMANTIC: 0.5}, because=2), profile, title) == \
        "similar to Alien (1979); matches your interests (Drama, Comedy)"
    assert explain(Candidate(5, {C.POPULARITY: 1.0}), profile, title) == "popular with everyone"
    cold = UserProfile(8, np.array([]), np.array([]), np.zeros(0), np.zeros((0, 2)), np.zeros(0), [], [])
    assert explain(Candidate(5, {C.POPULARITY: 1.0}), cold, title) == "popular right now"


def test_a_recommendation_excludes_history_and_blocked_and_follows_the_users_genre(world):
    items, index, recommender, client = world
    profile, recs = recommender.recommend(1, n=5, blocked={104})
    seen = set(int(i) for i in profile.history)
    ids = [r["item_id"] for r in recs]
    assert len(ids) == 5 == len(set(ids)) and not seen & set(ids) and 104 not in ids
    assert profile.top_categories[0][0] == "Drama"  # user 1 likes genre 0
    assert all(r["why"] and r["title"] for r in recs)
    assert client.calls[-1][1] == 1  # `score` pinned to the index's encoder version
    # Popularity alone, no profile score, no MMR: the most popular items the user has not seen, in order.
    _, popular = recommender.recommend(1, n=3, channels=("popularity",), use_triton_score=False, diversify=False)
    order = [int(recommender.item_ids[i]) for i in np.argsort(-recommender.popularity, kind="stable")]
    expected = [i for i in order if i not in seen][:3]
    got = [r["item_id"] for r in popular]
    assert [recommender.popularity[recommender.item_ids.tolist().index(i)] for i in got] == \
        [recommender.popularity[recommender.item_ids.tolist().index(i)] for i in expected]


def test_unknown_channels_and_malformed_settings_are_refused(world):
    recommender = world[2]
    with pytest.raises(ValueError, match="unknown recall channel"):
        recommender.recommend(1, channels=("collaborative",))
    with pytest.raises(ValueError, match="one entry per recall channel"):
        RecommenderSettings(quotas={C.SEMANTIC: 10})
    with pytest.raises(ValueError, match="mmr_lambda"):
        RecommenderSettings(mmr_lambda=2.0)


def test_cold_users_get_popular_items_and_profiles_are_cached_per_index(world):
    items, index, recommender, _ = world
    profile, recs = recommender.recommend(999, n=4)
    assert profile.is_cold and len(recs) == 4 and all(r["why"] == "popular right now" for r in recs)
    assert recommender.profile(1) is recommender.profile(1)
    assert recommender.similar_users(1, k=3)[0][0] in {5, 9}  # same genre as user 1


def test_an_unknown_user_with_a_recent_history_is_profiled_from_it(world):
    items, index, recommender, _ = world
    horror = [it.item_id for it in items if it.categories == ("Horror",)][:6]
    profile, recs = recommender.recommend(10**6, n=5, history=horror, use_triton_score=False)
    assert not profile.is_cold and profile.top_categories[0][0] == "Horror"
    assert not set(horror) & {r["item_id"] for r in recs}
    # A known user's own history wins over one passed in; nothing is cached for the unknown one.
    assert recommender.profile(1, history=horror).top_categories[0][0] == "Drama"
    assert recommender.profile(10**6).is_cold


def test_fresh_rows_join_the_list_without_reordering_it():
    from bert_recsys.client.ranking import with_fresh

    assert with_fresh([1, 2, 3, 4], [9], 4) == [1, 2, 3, 9]        # the last established item makes room
    assert with_fresh([1, 9, 3, 4], [9], 4) == [1, 9, 3, 4]        # already placed: stays where it is
    assert with_fresh([1, 2, 3], [9], 4) == [1, 2, 3, 9]           # a free place first
    assert with_fresh([1, 2, 3, 4], [8, 9], 4) == [1, 2, 8, 9]
    assert with_fresh([1, 2, 3, 4, 5], [], 4) == [1, 2, 3, 4]


def test_a_new_item_added_live_is_recommended_to_the_user_whose_likes_it_resembles():
    """The offline half of the live path (tests/integration/test_recommend.py runs it through Triton): the new
    item has no interaction, enters by the item-to-item channel, takes a fresh slot and says why."""
    items, bare = catalog()
    with pytest.raises(Exception, match="not a built-in one"):
        Recommender(items, bare, interactions(), EmbedClient(bare)).add_item(Item(9000, "x"))  # no template recorded
    index = ItemIndex(bare.item_ids, bare.raw_vectors, ENCODER, template=TEMPLATE.identity)
    data = interactions()
    recommender = Recommender(items, index, data, EmbedClient(index))
    user = 1  # likes genre 0 (Drama)
    liked = recommender.profile(user).liked
    assert 9000 not in [r["item_id"] for r in recommender.recommend(user, n=10)[1]]
    twin = index.vectors_of([int(liked[-1])])[0]
    EmbedClient.next_vector = twin + 0.01
    new = Item(9000, "Brand new drama (2026)", ("Drama",), "a film nobody has rated yet")
    with pytest.raises(TemplateMismatch, match="title@"):
        recommender.add_item(new, template=TEMPLATES["title"])
    recommender.add_item(new)
    assert recommender.is_new(9000) and index.has(9000)
    _, recs = recommender.recommend(user, n=10)
    fresh = [r for r in recs if r["item_id"] == 9000]
    assert fresh and fresh[0]["new"] and fresh[0]["why"].startswith("new: because you liked ")
    assert sum(r["new"] for r in recs) == recommender.settings.fresh_slots
    with pytest.raises(ValueError, match="already in the catalog"):
        recommender.add_item(new)
    other_user = 2  # likes genre 1: the drama is not close enough to anything it liked (the stand-in's profile
    # score answers every profile with a drama's vector, so it is left out here)
    assert 9000 not in [r["item_id"] for r in recommender.recommend(other_user, n=10, use_triton_score=False)[1]]


class EmbedClient(FakeScoreClient):
    """A stand-in for Triton's `embed` (and `score`) over the test catalog's vectors."""

    next_vector = None

    def __init__(self, index):
        super().__init__(index.vectors[0])

    def embed(self, texts, encoder_version=None):
        vector = np.asarray(self.next_vector, dtype=np.float32)
        return (vector / np.linalg.norm(vector))[None, :]


from bert_recsys.client.index import TemplateMismatch  # noqa: E402
from bert_recsys.client.item_text import TEMPLATES  # noqa: E402

TEMPLATE = TEMPLATES["rich"]


def test_ease_weights_follow_the_closed_form_and_leave_items_without_positives_out():
    from scipy import sparse

    from bert_recsys.client.recall import ease_weights

    rng = np.random.default_rng(5)
    x = (rng.random((40, 12)) < 0.3).astype(np.float64)
    x[:, 7] = 0.0                                   # an item nobody liked
    b = ease_weights(sparse.csr_matrix(x), 3.0)
    p = np.linalg.inv(x.T @ x + 3.0 * np.eye(12))
    expected = np.eye(12) - p / np.diag(p)
    assert np.allclose(b, expected, atol=1e-5) and np.allclose(np.diag(b), 0.0)
    assert not b[7].any() and not b[:, 7].any()
    with pytest.raises(ValueError, match="lambda"):
        ease_weights(sparse.csr_matrix(x), 0.0)


def test_ease_side_information_joins_the_gram_matrix_of_the_items_with_positives():
    from scipy import sparse

    from bert_recsys.client.recall import ease_weights

    rng = np.random.default_rng(6)
    x = (rng.random((40, 12)) < 0.3).astype(np.float64)
    x[:, 7] = 0.0
    e = rng.normal(size=(12, 4))
    side = 2.0 * e @ e.T                            # alpha x cosines-like, positive semi-definite
    b = ease_weights(sparse.csr_matrix(x), 3.0, side=side)
    active = [i for i in range(12) if i != 7]
    g = (x.T @ x + side)[np.ix_(active, active)] + 3.0 * np.eye(11)
    p = np.linalg.inv(g)
    expected = np.eye(11) - p / np.diag(p)
    assert np.allclose(b[np.ix_(active, active)], expected, atol=1e-4)
    assert not b[7].any() and not b[:, 7].any()       # side information gives no weights to an item nobody liked
    assert not np.allclose(b, ease_weights(sparse.csr_matrix(x), 3.0), atol=1e-3)
    with pytest.raises(ValueError, match="items, items"):
        ease_weights(sparse.csr_matrix(x), 3.0, side=side[:5, :5])


def test_the_ease_scorer_takes_side_information_for_the_items_it_scores():
    from bert_recsys.client.catalog import Interactions
    from bert_recsys.client.scorers import EaseScorer

    rng = np.random.default_rng(7)
    n = 300
    data = Interactions(rng.integers(0, 30, n).astype(np.int64), rng.integers(100, 120, n).astype(np.int64),
                        rng.choice([2.0, 4.0, 5.0], n).astype(np.float32), np.arange(n, dtype=np.int64))
    seen = []

    def side(item_ids):
        seen.append(item_ids.copy())
        e = (item_ids[:, None] % 3 == np.arange(3)).astype(np.float64)  # the item id's class, as a 3-dim vector
        return 5.0 * e @ e.T

    plain, with_text = EaseScorer(data, 10.0), EaseScorer(data, 10.0, side=side)
    assert len(seen) == 1 and np.array_equal(seen[0], plain.item_ids)  # asked once, for the items EASE^R scores
    assert not np.allclose(plain.weights, with_text.weights, atol=1e-4)
    assert np.allclose(EaseScorer(data, 10.0, side=lambda ids: np.zeros((len(ids), len(ids)))).weights, plain.weights)


def test_every_channel_scores_any_item_as_it_proposes_it_and_the_ranker_sees_all_of_them(world):
    from bert_recsys.client.ranking import fill_scores
    from bert_recsys.client.recall import default_channels

    items, index, recommender, _ = world
    assert recommender.fitted.ease is not None and recommender.fitted.cooccurrence is None  # 60 items: EASE^R
    profile = recommender.profile(1)
    seeds = recommender.seeds(profile)
    for name, channel in default_channels(recommender.fitted).items():
        proposals = channel.propose(seeds, index, 30)
        ids = np.array(proposals.item_ids[:30])
        best = {}
        for i, score in zip(ids, proposals.scores[:30]):
            best.setdefault(int(i), float(score))
        scored = channel.score(seeds, index, np.array(list(best)))
        assert np.allclose(scored, list(best.values()), atol=1e-5), name
    assert C.COOCCURRENCE in seeds.memo  # the CF totals of this request: summed once, for recall and scoring
    # A candidate proposed by one channel only gets the others' scores; a better score already there stays.
    candidates = [Candidate(100, {C.POPULARITY: 0.5}), Candidate(101, {C.ITEM2ITEM: 0.9})]
    fill_scores(candidates, C.ITEM2ITEM, np.array([0.2, 0.4]))
    fill_scores(candidates, C.SEMANTIC, np.array([np.nan, 0.3]))
    assert candidates[0].scores == {C.POPULARITY: 0.5, C.ITEM2ITEM: 0.2}
    assert candidates[1].scores == {C.ITEM2ITEM: 0.9, C.SEMANTIC: 0.3}
    small = Recommender(items, index, interactions(), world[3], RecommenderSettings(ease_max_items=10))
    assert small.fitted.ease is None and small.fitted.cooccurrence is not None  # over the limit: co-occurrence
    assert small.recommend(1, n=5)[1]
