"""Recommendations' share of a canary: which catalog index a recommendation is served from while a rollout runs.

A recommendation scores item vectors against a query encoded by Triton, so both must come from one encoder version.
The rollout embeds the catalog with the canary version before its canary window (rollout.steps.canary_index) and
publishes that index in the IndexStore beside the current one. `CanaryIndexes.pick()` sends `share` of the calls
to it: while the encoder's config shows a canary, and only once the store holds the index that this very export
embedded (its manifest hash is in the name; a version number is reused after a rollback). Everything else, and
every call when anything about the canary cannot be read, stays on the stable index: the canary is optional.
"""
from __future__ import annotations

import random
import threading
from typing import Callable

from bert_recsys import logs
from bert_recsys.client.errors import ServingError
from bert_recsys.client.index import IndexFileError, ItemIndex, TemplateMismatch
from bert_recsys.client.triton import ServingView, canary_version

log = logs.get("client")


class CanaryIndexes:
    """`share` of recommendation calls to the canary's catalog index (see the module's docstring). `recommender` is
    a client.recommend.Recommender with an index store; `view()` returns the served versions (a client's
    `serving_view`, cached for a few seconds); `draw()` returns a number in [0, 1)."""

    def __init__(self, recommender, view: Callable[[], ServingView], share: float,
                 draw: Callable[[], float] = random.random):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the canary share must be within [0, 1], not {share}")
        if recommender.index_store is None:
            raise ValueError("a canary share of recommendations needs the recommender's index store")
        self.recommender, self.view, self.share, self.draw = recommender, view, share, draw
        self._lock = threading.Lock()
        self._held: tuple[str, ItemIndex] | None = None
        self._refused: str | None = None  # an index that could not be used: not tried again on every call

    def pick(self) -> ItemIndex | None:
        """The canary's index for this call, or None (the stable one)."""
        draw = self.draw()
        if draw >= self.share:
            return None
        try:
            view = self.view()
        except ServingError:  # Triton unreachable: the stable path answers (or fails) as it would anyway
            return None
        version = canary_version(view, self.share, draw)
        if version is None:
            self._held = None  # promoted or rolled back: let its index go
            return None
        return self._index(version, view.export(version).get("export_manifest_sha256"))

    def _index(self, version: int, manifest: str | None) -> ItemIndex | None:
        store, rec = self.recommender.index_store, self.recommender
        name = store.find(version, manifest, rec.index.template)
        if name is None or name == self._refused:
            return None  # the rollout has not published it yet
        with self._lock:  # one load per index, however many threads draw the canary at once
            held = self._held
            try:
                if held is None or held[0] != name:
                    held = self._held = (name, rec.adopt(store.load(name)))
                    log.info("recommendations: %.0f%% of calls from the canary's index %s", 100 * self.share, name)
                elif len(held[1]) < len(rec.index):
                    rec.adopt(held[1])  # items added live since it was loaded
            except (OSError, IndexFileError, TemplateMismatch, ValueError, ServingError) as error:
                log.warning("canary index %s not used, recommendations stay on the stable one: %s", name, error)
                self._held, self._refused = None, name
                return None
        return held[1]
