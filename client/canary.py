"""Catalog indexes of other encoder versions than the current one, and recommendations' share of a canary.

A recommendation scores item vectors against a query encoded by Triton, so both must come from one encoder version.
The rollout embeds the catalog with the canary version before its canary window (rollout.steps.canary_index) and
publishes that index in the IndexStore beside the current one. `CanaryIndexes.pick()` sends `share` of the calls
to it: while the encoder's config shows a canary, and only once the store holds the index that this very export
embedded (its manifest hash is in the name; a version number is reused after a rollback). Everything else, and
every call when anything about the canary cannot be read, stays on the stable index: the canary is optional.

`VersionIndexes` holds such indexes (a canary's, or the ones experiment arms are pinned to): each loaded once by
name and made to hold the live catalog (`Recommender.adopt`), safely for the gateway's many threads.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Callable

from bert_recsys import logs
from bert_recsys.client.errors import InvalidRequest, ServingError
from bert_recsys.client.index import ItemIndex
from bert_recsys.client.triton import ServingView, canary_version

log = logs.get("client")
LOOKUP_TTL_S = 2.0      # how long a "which index of version N is published" answer is reused
RETRY_AFTER_S = 30.0    # a canary index that failed to load for a passing reason (Triton, the disk) is tried again after


class VersionIndexes:
    """The recommender's index store's indexes of other versions, by (version, export): `get` loads one once, adopts
    it (items added live are embedded into it by its own version), and keeps it until `clear`."""

    def __init__(self, recommender, clock: Callable[[], float] = time.monotonic):
        if recommender.index_store is None:
            raise ValueError("indexes of other encoder versions need the recommender's index store")
        self.recommender, self.clock = recommender, clock
        self._held: dict[str, ItemIndex] = {}
        self._names: dict[tuple[int, str | None], tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def name(self, version: int, manifest: str | None = None) -> str | None:
        """The newest published index of `version` (of that export), looked up at most every LOOKUP_TTL_S."""
        key, now = (int(version), manifest), self.clock()
        found = self._names.get(key)
        if found is None or now - found[0] > LOOKUP_TTL_S:
            rec = self.recommender
            found = self._names[key] = (now, rec.index_store.find(version, manifest, rec.index.template))
        return found[1]

    def get(self, version: int, manifest: str | None = None, wait: bool = True) -> ItemIndex | None:
        """The index, or None when none is published. `wait=False`: None, too, while another thread loads it (the
        caller serves elsewhere meanwhile). Loading errors are raised: OSError; ValueError (IndexFileError,
        TemplateMismatch, an index of other items, or InvalidRequest while adopting); ServingError while adopting."""
        name = self.name(version, manifest)
        if name is None:
            return None
        rec = self.recommender
        index = self._held.get(name)
        if index is not None and len(index) >= len(rec.index):
            return index
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            index = self._held.get(name)
            if index is None:
                index = rec.adopt(rec.index_store.load(name))
                log.info("catalog index %s (encoder version %d) loaded beside the current one", name, version)
            elif len(index) < len(rec.index):
                rec.adopt(index)  # items added live since it was loaded
            self._held = {**self._held, name: index}  # replaced whole: readers never see it half-changed
            return index
        finally:
            self._lock.release()

    def clear(self) -> None:
        """Let every held index go (the canary was promoted or rolled back)."""
        if self._held or self._names:
            self._held, self._names = {}, {}


class CanaryIndexes:
    """`share` of recommendation calls to the canary's catalog index (see the module's docstring). `recommender` is
    a client.recommend.Recommender with an index store; `view()` returns the served versions (a client's
    `serving_view`, cached for a few seconds); `draw()` returns a number in [0, 1)."""

    def __init__(self, recommender, view: Callable[[], ServingView], share: float,
                 draw: Callable[[], float] = random.random, clock: Callable[[], float] = time.monotonic):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the canary share must be within [0, 1], not {share}")
        self.indexes = VersionIndexes(recommender, clock)
        self.view, self.share, self.draw, self.clock = view, share, draw, clock
        self._refused: dict[str, float] = {}  # index name -> when it may be tried again

    def pick(self) -> ItemIndex | None:
        """The canary's index for this call, or None (the stable one). Never raises: the canary is optional."""
        draw = self.draw()
        if draw >= self.share:
            return None
        try:
            return self._pick(draw)
        except Exception as error:  # noqa: BLE001 - whatever went wrong, the stable index serves this call
            log.warning("recommendations stay on the stable index: %s: %s", type(error).__name__, error)
            return None

    def _pick(self, draw: float) -> ItemIndex | None:
        try:
            view = self.view()
        except (ServingError, InvalidRequest):  # Triton unreachable: the stable path answers (or fails) as usual
            return None
        version = canary_version(view, self.share, draw)
        if version is None:  # promoted or rolled back: let its index go, and any refusal with it
            self.indexes.clear()
            self._refused = {}
            return None
        manifest = view.export(version).get("export_manifest_sha256")
        name = self.indexes.name(version, manifest)
        if name is None or self._refused.get(name, 0.0) > self.clock():
            return None  # not published yet, or refused a moment ago
        try:
            index = self.indexes.get(version, manifest, wait=False)  # another thread loading it: stable meanwhile
        except ValueError as error:  # other items, another template, an unreadable file: never tried again
            self._refused[name] = float("inf")
            log.warning("canary index %s not used, recommendations stay on the stable one: %s", name, error)
            return None
        except (OSError, ServingError) as error:  # may pass: tried again later
            self._refused[name] = self.clock() + RETRY_AFTER_S
            log.warning("canary index %s not loaded (tried again in %.0f s): %s", name, RETRY_AFTER_S, error)
            return None
        return index
