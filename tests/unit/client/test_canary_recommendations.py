"""Recommendations' canary share, without a server: the canary's catalog index is found in the index store by
version, export and template; it gets its share of calls; items added live reach it and the promoted index; a
call the canary fails is served by the stable version. A stand-in for Triton answers from the vectors it is given."""
from __future__ import annotations

import random

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.client.canary import CanaryIndexes
from bert_recsys.client.catalog import Interactions, Item
from bert_recsys.client.errors import ServingError, Unavailable
from bert_recsys.client.experiments import Arm, Experiment, ExperimentRecommender
from bert_recsys.client.index import IndexStore, ItemIndex
from bert_recsys.client.item_text import TEMPLATES
from bert_recsys.client.recommend import Recommender
from bert_recsys.client.triton import ServingView

TEMPLATE = TEMPLATES["rich"]
STABLE, CANARY, OTHER = "a" * 64, "b" * 64, "c" * 64
WITH_CANARY = ServingView(1, (1, 2), {1: {"export_manifest_sha256": STABLE}, 2: {"export_manifest_sha256": CANARY}})
STABLE_ONLY = ServingView(1, (1,), {1: {"export_manifest_sha256": STABLE}})
DIM = 8


class FakeTriton:
    """`embed` returns a vector per text (by its hash, so every version agrees on it); `score` the cosines; calls to
    the versions in `failing` fail as Triton fails them."""

    settings = settings.SETTINGS

    def __init__(self):
        self.failing, self.calls = set(), []

    def _check(self, what, version):
        self.calls.append((what, version))
        if version in self.failing:
            raise ServingError(f"{what}_v{version}: INTERNAL: the canary fails every call")

    def embed(self, texts, encoder_version=None):
        self._check("embed", encoder_version)
        vectors = np.array([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=DIM) for t in texts], np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    embed_many = embed

    def score(self, texts, candidates, outputs=None, encoder_version=None):
        self._check("score", encoder_version)
        return {self.settings.tensors.scores: candidates @ candidates[0, 0]}


def make_index(items, client, version: int, manifest: str) -> ItemIndex:
    texts = [TEMPLATE.render(item) for item in items]
    return ItemIndex(np.array([i.item_id for i in items]), client.embed(texts), {"export_version": str(version),
                     "export_variant": "onnx-int8", "export_manifest_sha256": manifest}, texts=texts,
                     template=TEMPLATE.identity)


@pytest.fixture
def world(tmp_path):
    """A 40-item catalog, 6 users who each liked 6 items, and a store with version 1's index (current) and the
    canary version 2's, published by the rollout before its window."""
    rng = np.random.default_rng(0)
    items = [Item(100 + i, f"Film {i} ({2000 + i})", ("Drama" if i % 2 else "Comedy",), f"story number {i}")
             for i in range(40)]
    rows = [(u, 100 + int(i), 5.0, t) for u in range(1, 7) for t, i in enumerate(rng.choice(40, 6, replace=False))]
    user, item, rating, when = (np.array(c) for c in zip(*rows))
    data = Interactions(user.astype(np.int64), item.astype(np.int64), rating.astype(np.float32), when.astype(np.int64))
    client = FakeTriton()
    store = IndexStore(tmp_path / "indexes")
    store.switch(store.publish(make_index(items, client, 1, STABLE)))
    canary_name = store.publish(make_index(items, client, 2, CANARY))
    recommender = Recommender(items, store.load(), data, client, index_store=store)
    return recommender, store, client, canary_name


def test_the_store_finds_an_index_by_version_export_and_template(world, tmp_path):
    _, store, client, canary_name = world
    assert store.find(2) == store.find(2, CANARY) == store.find(2, CANARY, TEMPLATE.identity) == canary_name
    assert store.find(2, OTHER) is None                       # version 2 of another export (before a rollback)
    assert store.find(2, CANARY, TEMPLATES["title"].identity) is None
    assert store.find(3) is None
    assert store.find(1) == store.current_name()
    # Being written (renamed into place whole when done): not found, not listed.
    incoming = store.root / f".{canary_name}.incoming"
    incoming.mkdir()
    (incoming / "index.json").write_text("{}")
    assert canary_name in store.names() and not any(n.startswith(".") for n in store.names())
    assert IndexStore(tmp_path / "nowhere").find(2) is None


def test_the_canary_gets_its_share_from_its_own_index_once_published(world):
    recommender, store, client, canary_name = world
    views = iter([WITH_CANARY, STABLE_ONLY])
    draws = iter([0.9, 0.1, 0.1])
    canary = CanaryIndexes(recommender, lambda: next(views), 0.25, draw=lambda: next(draws))
    assert canary.pick() is None                              # drawn for the stable version: the view is not read
    index = canary.pick()
    assert index.encoder_version == 2 and index.encoder["export_manifest_sha256"] == CANARY
    assert canary.pick() is None and canary.indexes._held == {}  # promoted or rolled back: its index is let go

    def raising():
        raise Unavailable("Triton is down")

    assert CanaryIndexes(recommender, raising, 1.0).pick() is None
    assert CanaryIndexes(recommender, lambda: STABLE_ONLY, 1.0).pick() is None
    other = ServingView(1, (1, 2), {1: {"export_manifest_sha256": STABLE}, 2: {"export_manifest_sha256": OTHER}})
    assert CanaryIndexes(recommender, lambda: other, 1.0).pick() is None  # this export's index is not published yet
    rng = random.Random(3)
    shared = CanaryIndexes(recommender, lambda: WITH_CANARY, 0.25, draw=rng.random)
    picks = [shared.pick() for _ in range(4000)]
    assert abs(sum(p is not None for p in picks) / 4000 - 0.25) < 0.02
    assert len({id(p) for p in picks if p is not None}) == 1  # loaded once
    with pytest.raises(ValueError, match="within"):
        CanaryIndexes(recommender, lambda: WITH_CANARY, 1.5)


def test_items_added_live_reach_the_canary_and_the_promoted_index(world):
    """Before: an item added live made every call after the promotion fail (the store's new index lacked it)."""
    recommender, store, client, canary_name = world
    new = Item(999, "Brand new film (2026)", ("Drama",), "nobody has rated it yet")
    recommender.add_item(new)
    index = CanaryIndexes(recommender, lambda: WITH_CANARY, 1.0).pick()
    assert index.has(999) and ("embed", 2) in client.calls    # embedded by the canary's own version
    assert index.texts[-1] == TEMPLATE.render(new)
    store.switch(canary_name)                                 # the promotion
    assert recommender.refresh_index() and recommender.index.has(999) and recommender.index.encoder_version == 2
    _, items = recommender.recommend(1, n=5)
    assert len(items) == 5


def test_an_index_of_unknown_items_is_refused_and_the_stable_one_serves(world):
    recommender, store, client, _ = world
    stranger = Item(5000, "Not in this catalog", ("Drama",))
    items = [*recommender.items.values(), stranger]
    store.publish(make_index(items, client, 2, OTHER))
    view = ServingView(1, (1, 2), {1: {"export_manifest_sha256": STABLE}, 2: {"export_manifest_sha256": OTHER}})
    loads = []
    real_load = store.load
    store.load = lambda name=None, template=None: loads.append(name) or real_load(name, template)
    canary = CanaryIndexes(recommender, lambda: view, 1.0)
    assert [canary.pick() for _ in range(5)] == [None] * 5 and len(loads) == 1  # refused once, not loaded again
    with pytest.raises(ValueError, match="does not know"):
        recommender.adopt(real_load(store.find(2, OTHER)))
    # A passing failure (Triton, while embedding the items added live) is tried again later, not at every call.
    clock = [0.0]
    recommender.add_item(Item(998, "Added live (2026)", ("Comedy",), "new"))
    client.failing.add(2)
    flaky = CanaryIndexes(recommender, lambda: WITH_CANARY, 1.0, clock=lambda: clock[0])
    loads.clear()
    assert [flaky.pick() for _ in range(3)] == [None] * 3 and len(loads) == 1
    client.failing.clear()
    clock[0] = 31.0
    index = flaky.pick()
    assert index is not None and index.has(998) and len(loads) == 2


def test_one_thread_loads_an_index_while_the_others_serve_the_stable_one_or_wait(world):
    import threading

    from bert_recsys.client.canary import VersionIndexes

    recommender, store, _, canary_name = world
    loads, release = [], threading.Event()
    real_load = store.load

    def slow_load(name=None, template=None):
        loads.append(name)
        release.wait(10)
        return real_load(name, template)

    store.load = slow_load
    indexes = VersionIndexes(recommender)
    loader = threading.Thread(target=indexes.get, args=(2, CANARY))
    loader.start()
    while not loads:
        threading.Event().wait(0.01)
    assert indexes.get(2, CANARY, wait=False) is None         # being loaded: the caller serves elsewhere
    waiting = []
    waiters = [threading.Thread(target=lambda: waiting.append(indexes.get(2, CANARY))) for _ in range(4)]
    for thread in waiters:
        thread.start()
    release.set()
    for thread in [loader, *waiters]:
        thread.join(10)
    assert len(loads) == 1 and len(waiting) == 4 and len({id(i) for i in waiting}) == 1
    assert waiting[0].encoder_version == 2
    indexes.clear()
    assert indexes.get(2, CANARY) is not waiting[0] and len(loads) == 2


def test_a_recommendation_the_canary_fails_is_served_by_the_stable_version(world):
    recommender, _, client, _ = world
    served = ExperimentRecommender(recommender, None, CanaryIndexes(recommender, lambda: WITH_CANARY, 1.0))
    first = served.recommend(1, n=5)
    assert (first.encoder_version, first.fell_back) == (2, False) and ("score", 2) in client.calls
    client.failing.add(2)
    again = served.recommend(1, n=5)
    assert (again.encoder_version, again.fell_back) == (1, True)
    assert [r["item_id"] for r in again.items] == [r["item_id"] for r in recommender.recommend(1, n=5)[1]]
    # An arm pinned to a version is its own canary: the share never moves it.
    experiment = Experiment("pinned", (Arm("control", encoder_version=1), Arm("other", encoder_version=1)))
    client.failing.clear()
    arms = ExperimentRecommender(recommender, experiment, CanaryIndexes(recommender, lambda: WITH_CANARY, 1.0))
    assert {arms.recommend(u, n=5).encoder_version for u in range(1, 7)} == {1}
