"""Recommendations inside an experiment: the user's arm decides what differs, and every list carries the ids
its events will name (request id, experiment, arm, encoder version)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from bert_recsys import logs
from bert_recsys.client.canary import CanaryIndexes, VersionIndexes
from bert_recsys.client.experiments.design import Arm, Experiment, ExperimentError
from bert_recsys.client.index import ItemIndex
from bert_recsys.client.recommend import CHANNELS, Recommender
from bert_recsys.client.triton import CANARY_FALLBACK

log = logs.get("client")


@dataclass(frozen=True)
class Served:
    request_id: str
    experiment: str | None
    arm: str | None
    encoder_version: int
    user_id: int
    items: list[dict]
    profile: object = field(repr=False, default=None)
    fell_back: bool = False   # drawn for the canary, which failed it: served by the stable version

    def impression(self, event_id: str | None = None, ts: float | None = None) -> dict:
        """The impression event for showing this whole list, in order (positions 0..n-1)."""
        event = {"event_id": event_id or f"imp-{self.request_id}", "type": "impression", "request_id": self.request_id,
                 "user_id": self.user_id, "encoder_version": self.encoder_version,
                 "items": [r["item_id"] for r in self.items]}
        if self.experiment is not None:
            event.update(experiment=self.experiment, arm=self.arm)
        if ts is not None:
            event["ts"] = ts
        return event


class ExperimentRecommender:
    """A Recommender behind an experiment. Arms pinned to an encoder version serve from the index store's index
    for that version (embedded by it; a rollout publishes one), so vectors and version always go together.
    `canary` (client.canary.CanaryIndexes) sends its share of the other calls to a canary's index while a rollout
    runs one; a call the canary fails is served again from the stable index (`Served.fell_back`)."""

    def __init__(self, recommender: Recommender, experiment: Experiment | None, canary: CanaryIndexes | None = None):
        self.recommender = recommender
        self.experiment = experiment
        self.canary = canary
        pinned = experiment is not None and any(arm.encoder_version is not None for arm in experiment.arms)
        self._pinned = VersionIndexes(recommender) if pinned and recommender.index_store is not None else None

    def index_for(self, arm: Arm) -> ItemIndex | None:
        if arm.encoder_version is None:
            return None
        version = arm.encoder_version
        current = self.recommender.index
        if current.encoder_version == version:
            return current
        store = self.recommender.index_store
        try:
            index = self._pinned.get(version) if self._pinned is not None else None
        except (OSError, ValueError) as error:
            raise ExperimentError(f"arm {arm.name}: the catalog index of encoder version {version} cannot be "
                                  f"used: {error}") from None
        if index is None:
            raise ExperimentError(f"arm {arm.name}: no catalog index embedded by encoder version {version}"
                                  + (f" in {store.root}" if store is not None else " (no index store)"))
        return index

    def recommend_arm(self, arm: Arm, user_id: int, n: int = 10, blocked=frozenset(), history=None,
                      index: ItemIndex | None = None):
        """One arm's list for a user, whatever arm the user is assigned: -> (profile, items, encoder version).
        `index` serves it from that index instead of the arm's own (the canary's)."""
        rec = self.recommender
        index = index or self.index_for(arm)
        weights = {**rec.settings.weights, **arm.channel_weights} if arm.channel_weights else None
        profile, items = rec.recommend(user_id, n=n, blocked=blocked, history=history,
                                       channels=arm.channels or CHANNELS, diversify=arm.diversify, weights=weights,
                                       index=index)
        return profile, items, (index or rec.index).encoder_version

    def recommend(self, user_id: int, n: int = 10, blocked=frozenset(), history=None, diversify: bool = True,
                  request_id: str | None = None) -> Served:
        """The list for the user's arm (or the recommender's own, outside an experiment), with its ids. Inside an
        experiment the arm decides `diversify`. Outside one, and in arms not pinned to a version, the canary takes
        its share."""
        request_id = request_id or uuid.uuid4().hex
        arm = self.experiment.assign(user_id) if self.experiment is not None else None
        name = self.experiment.name if self.experiment is not None else None
        canary = (self.canary.pick() if self.canary is not None and (arm is None or arm.encoder_version is None)
                  else None)
        if canary is not None:
            try:
                profile, items, version = self._serve(arm, user_id, n, blocked, history, diversify, canary)
                return Served(request_id, name, arm and arm.name, version, int(user_id), items, profile)
            except CANARY_FALLBACK as error:  # Triton's metrics keep the canary's failure for the rollout's verdict
                log.debug("canary v%s failed a recommendation, served by the stable version: %s",
                            canary.encoder_version, error)
        profile, items, version = self._serve(arm, user_id, n, blocked, history, diversify)
        return Served(request_id, name, arm and arm.name, version, int(user_id), items, profile,
                      fell_back=canary is not None)

    def _serve(self, arm: Arm | None, user_id, n, blocked, history, diversify, index: ItemIndex | None = None):
        if arm is not None:
            return self.recommend_arm(arm, user_id, n, blocked, history, index)
        rec = self.recommender
        profile, items = rec.recommend(user_id, n=n, blocked=blocked, history=history, diversify=diversify, index=index)
        return profile, items, (index or rec.index).encoder_version
