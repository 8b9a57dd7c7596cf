"""The evaluation protocols' arithmetic on small fixtures: no hidden item's interaction reaches training, the test
population is the one the protocol names, metrics and their standard errors, and the scorers' user models."""
import math

import numpy as np
import pytest

from bert_recsys.client.catalog import Interactions, Item
from bert_recsys.client.protocols import (ItemHoldout, item_holdout, pool, rank_metrics, summarise, temporal_split,
                              validation_split)
from bert_recsys.client.scorers import (EaseScorer, GenreScorer, RandomScorer, TfidfScorer, UserHistory, VectorScorer, centred,
                            histories, rank, user_vector_scores)


def interactions(rows) -> Interactions:
    users, items, ratings, times = zip(*rows)
    return Interactions.from_rows(users, items, ratings, times)


def synthetic(n_users=60, n_items=100, per_user=25, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        for t, item in enumerate(rng.choice(n_items, per_user, replace=False)):
            rows.append((user, int(item), float(rng.choice([2.0, 4.0, 5.0])), 1000 * user + t))
    return interactions(rows)


def test_no_interaction_with_a_hidden_item_reaches_training():
    data = synthetic()
    split = item_holdout(np.arange(100), data, ItemHoldout(seed=3))
    assert len(split.hidden) == 20 and len(np.unique(split.hidden)) == 20
    assert not np.isin(split.train.item, split.hidden).any()
    # Everything else is kept: training is exactly the interactions on visible items.
    assert len(split.train) == int((~np.isin(data.item, split.hidden)).sum())
    for user, positives in split.truth.items():
        assert positives <= set(split.hidden.tolist())
        mine = data.take(data.user == user)
        assert positives == set(mine.item[(mine.rating >= 4) & np.isin(mine.item, split.hidden)].tolist())
        visible_likes = split.train.take((split.train.user == user) & (split.train.rating >= 4))
        assert len(visible_likes) >= 5
    # Another seed hides other items; the same seed the same ones.
    assert not np.array_equal(item_holdout(np.arange(100), data, ItemHoldout(seed=4)).hidden, split.hidden)
    np.testing.assert_array_equal(item_holdout(np.arange(100), data, ItemHoldout(seed=3)).hidden, split.hidden)


def test_a_user_without_enough_visible_positives_is_not_a_test_user():
    rows = [(1, i, 5.0, i) for i in range(10)] + [(2, 0, 5.0, 1), (2, 1, 5.0, 2)]
    data = interactions(rows)
    split = item_holdout(np.arange(10), data, ItemHoldout(seed=0, fraction=0.3, min_visible_positives=5))
    assert set(split.truth) == {1}  # user 2 has at most 2 visible positives


def test_the_validation_split_hides_only_visible_items_and_never_touches_the_test_items():
    data = synthetic()
    split = item_holdout(np.arange(100), data, ItemHoldout(seed=1))
    inner = validation_split(split, np.arange(100))
    assert inner.validation_of == 1 and inner.spec.seed == 1001
    assert not np.isin(inner.hidden, split.hidden).any()
    assert not np.isin(inner.train.item, split.hidden).any() and not np.isin(inner.train.item, inner.hidden).any()
    for positives in inner.truth.values():
        assert positives <= set(inner.hidden.tolist())


def test_temporal_split_segments_cold_items_warm_items_and_cold_users():
    rows = [(1, 1, 5.0, 10), (1, 2, 5.0, 20), (2, 1, 4.0, 15), (2, 3, 5.0, 16), (3, 1, 5.0, 17), (4, 1, 5.0, 18),
            (1, 3, 5.0, 100), (1, 9, 5.0, 110), (2, 2, 4.5, 120), (5, 1, 5.0, 130), (2, 8, 1.0, 140)]
    split = temporal_split(interactions(rows), quantile=0.6)
    assert split.cutoff == int(np.quantile([r[3] for r in rows], 0.6))
    assert split.train.time.max() < split.cutoff
    assert split.warm_items == {1: {3}, 2: {2}} and split.cold_items == {1: {9}} and split.cold_users == {5: {1}}
    assert set(split.cold_item_ids.tolist()) == {8, 9}  # no interaction before the cutoff
    assert len(split.warnings()) == 3 and "noisy" in split.warnings()[0]


def test_rank_metrics_summaries_and_pooling():
    assert rank_metrics(np.array([5, 1, 7]), {1, 9}) == (0.5, 0.5, pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3))))
    s = summarise([(1.0, 1.0, 1.0), (0.0, 0.5, 0.0)])
    assert s["users"] == 2 and s["recall@10"] == 0.5 and s["recall@10_se"] == pytest.approx(0.5)
    pooled = pool([s, s])
    assert pooled["seeds"] == 2 and pooled["recall@10"] == 0.5
    assert pooled["recall@10_se"] == pytest.approx(0.5 / math.sqrt(2))


def test_vector_scorers_follow_their_user_representation():
    vectors = np.array([[1, 0], [0, 1], [0.8, 0.6], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    liked = vectors[[0, 0, 1]]
    weights = np.ones(3)
    candidates = vectors[[2, 3, 4]]
    assert np.argmax(user_vector_scores(candidates, liked, weights, "mean")) == 0  # the mean leans to item 0
    best = user_vector_scores(candidates, liked, weights, "maxsim", m=1)
    np.testing.assert_allclose(best, [0.8, 0.8, 0.0], atol=1e-6)
    user = UserHistory(1, np.array([10, 11]), np.array([5.0, 1.0]), np.array([0, 1]))
    scorer = VectorScorer("v", np.array([10, 11, 12, 13]), np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32), "mean")
    np.testing.assert_allclose(scorer.score(user, np.array([12, 13])), [1.0, 0.0])  # item 11 was not liked
    with pytest.raises(ValueError, match="unknown user representation"):
        VectorScorer("v", np.arange(2), np.eye(2), "median")


def test_centring_removes_the_common_direction():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(200, 16)) * 0.2 + 1.0
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    moved = centred(raw, np.arange(100))
    assert (raw @ raw.T).mean() > 0.9 and abs((moved[100:] @ moved[100:].T).mean()) < 0.1
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-6)


def test_genre_tfidf_random_and_ease_baselines_rank_the_obvious_item_first():
    items = [Item(1, "Space opera", ("Sci-Fi",), "starships and lasers in space"),
             Item(2, "Galaxy war", ("Sci-Fi",), "space lasers starships battle"),
             Item(3, "Tea time", ("Drama",), "a quiet english tea party"),
             Item(4, "Tea again", ("Drama",), "another quiet tea party")]
    ids = np.array([1, 2, 3, 4])
    user = UserHistory(7, np.array([1]), np.array([5.0]), np.array([0]))
    candidates = np.array([2, 3])
    assert rank(GenreScorer(items), user, candidates)[0] == 2
    texts = [f"{i.title}. {i.description}" for i in items]
    assert rank(TfidfScorer("t", ids, texts, [1, 2, 3, 4]), user, candidates)[0] == 2
    r = RandomScorer(seed=1)
    np.testing.assert_array_equal(r.score(user, candidates), r.score(user, candidates))
    train = interactions([(u, 1, 5.0, 0) for u in range(5)] + [(u, 2, 5.0, 1) for u in range(5)]
                         + [(9, 3, 5.0, 0), (9, 4, 5.0, 1)])
    ease = EaseScorer(train, lam=1.0)
    assert rank(ease, user, np.array([2, 3, 4]))[0] == 2
    assert ease.score(user, np.array([99]))[0] == -np.inf  # an item it never saw
    assert set(histories(train)) == {0, 1, 2, 3, 4, 9}


def test_the_evaluation_uses_a_fine_tuned_version_only_for_its_own_data_template_and_split():
    from bert_recsys.client.evaluate import unusable_version
    from bert_recsys.client.protocols import parse_split

    good = {"export_trained_split": "cold:1", "export_trained_data_sha256": "d" * 64, "export_trained_template": "rich@x"}
    assert unusable_version(good, "d" * 64, "rich@x") is None and parse_split(good["export_trained_split"]) == "cold:1"
    assert "not a recommendation fine-tune" in unusable_version({"export_variant": "onnx-int8"}, "d" * 64, "rich@x")
    assert "other data" in unusable_version(good, "e" * 64, "rich@x")
    assert "template title@y" in unusable_version({**good, "export_trained_template": "title@y"}, "d" * 64, "rich@x")
    with pytest.raises(ValueError, match="unknown split"):
        parse_split("cold:one")
