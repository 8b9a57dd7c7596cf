"""training.finetune's data, without torch: co-liked pairs come from the training part only, never from a hidden or
a validation item, and the recipe refuses nonsense."""
import numpy as np
import pytest

from bert_recsys.client.catalog import Interactions
from bert_recsys.training.finetune import Recipe, cooccurrence_pairs, training_split


def interactions(rows) -> Interactions:
    users, items, ratings, times = zip(*rows)
    return Interactions.from_rows(users, items, ratings, times)


def test_cooccurrence_pairs_need_enough_users_who_liked_both():
    rows = [(u, 1, 5.0, 0) for u in range(3)] + [(u, 2, 5.0, 1) for u in range(3)]  # 1 & 2: three users
    rows += [(0, 3, 5.0, 2), (9, 3, 5.0, 0), (9, 4, 5.0, 1)]                        # 1 & 3: one user
    rows += [(u, 5, 1.0, 3) for u in range(3)]                                        # disliked: not a positive
    pairs = cooccurrence_pairs(interactions(rows), min_cooccurrence=2)
    assert set(pairs.neighbours) == {1, 2}
    ids, weights = pairs.neighbours[1]
    assert ids.tolist() == [2] and weights.sum() == pytest.approx(1.0)
    assert sorted(set(pairs.anchors.tolist())) == [1, 2] and len(pairs.anchors) == 6
    anchors, positives = pairs.sample(np.random.default_rng(0), 8)
    assert all({a, p} == {1, 2} for a, p in zip(anchors, positives))
    assert cooccurrence_pairs(interactions(rows), min_cooccurrence=4).neighbours == {}


def test_training_pairs_never_touch_hidden_or_validation_items():
    rng = np.random.default_rng(0)
    rows = [(u, int(i), 5.0, t) for u in range(80) for t, i in enumerate(rng.choice(60, 20, replace=False))]
    data = interactions(rows)
    items = np.arange(60)
    for name in ("all", "cold:0", "cold:1", "warm", "temporal"):
        split = training_split(items, data, name)
        held = set(split.validation.hidden.tolist()) | set(split.excluded.tolist())
        assert held and not np.isin(split.train.item, list(held)).any()
        pairs = cooccurrence_pairs(split.train)
        assert pairs.neighbours and not pairs.items & held
        assert not np.isin(split.validation.hidden, split.excluded).any()
        if name.startswith("cold:"):
            assert len(split.excluded) == 12 and split.validation.validation_of == int(name[5:])
        if name in ("all", "warm"):
            assert len(split.excluded) == 0
        if name == "warm":  # each user's last 20% is out of training
            from bert_recsys.client.protocols import test_mask

            assert len(split.train) < int((~test_mask(data)).sum())
    with pytest.raises(ValueError, match="unknown split"):
        training_split(items, data, "cold:x")


def test_the_recipe_refuses_nonsense():
    with pytest.raises(ValueError, match="recipe out of range"):
        Recipe(steps=0)
    with pytest.raises(ValueError, match="recipe out of range"):
        Recipe(distill=-1.0)
