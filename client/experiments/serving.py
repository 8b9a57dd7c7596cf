"""Recommendations inside an experiment: the user's arm decides what differs, and every list carries the ids
its events will name (request id, experiment, arm, encoder version)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from bert_recsys.client.experiments.design import Arm, Experiment, ExperimentError
from bert_recsys.client.index import ItemIndex
from bert_recsys.client.recommend import CHANNELS, Recommender


@dataclass(frozen=True)
class Served:
    request_id: str
    experiment: str | None
    arm: str | None
    encoder_version: int
    user_id: int
    items: list[dict]
    profile: object = field(repr=False, default=None)

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
    for that version (embedded by it; a rollout publishes one), so vectors and version always go together."""

    def __init__(self, recommender: Recommender, experiment: Experiment | None):
        self.recommender = recommender
        self.experiment = experiment
        self._indexes: dict[int, ItemIndex] = {}

    def index_for(self, arm: Arm) -> ItemIndex | None:
        if arm.encoder_version is None:
            return None
        version = arm.encoder_version
        current = self.recommender.index
        if current.encoder_version == version:
            return current
        if version not in self._indexes:
            store = self.recommender.index_store
            names = [n for n in (store.names() if store is not None else []) if n.startswith(f"v{version}-")]
            if not names:
                raise ExperimentError(f"arm {arm.name}: no catalog index embedded by encoder version {version}"
                                      + (f" in {store.root}" if store is not None else " (no index store)"))
            self._indexes[version] = store.load(names[-1])
        return self._indexes[version]

    def recommend_arm(self, arm: Arm, user_id: int, n: int = 10, blocked=frozenset(), history=None):
        """One arm's list for a user, whatever arm the user is assigned: -> (profile, items, encoder version)."""
        rec = self.recommender
        index = self.index_for(arm)
        weights = {**rec.settings.weights, **arm.channel_weights} if arm.channel_weights else None
        profile, items = rec.recommend(user_id, n=n, blocked=blocked, history=history,
                                       channels=arm.channels or CHANNELS, diversify=arm.diversify, weights=weights,
                                       index=index)
        return profile, items, (index or rec.index).encoder_version

    def recommend(self, user_id: int, n: int = 10, blocked=frozenset(), history=None, diversify: bool = True,
                  request_id: str | None = None) -> Served:
        """The list for the user's arm (or the recommender's own, outside an experiment), with its ids. Inside an
        experiment the arm decides `diversify`."""
        request_id = request_id or uuid.uuid4().hex
        if self.experiment is None:
            profile, items = self.recommender.recommend(user_id, n=n, blocked=blocked, history=history,
                                                        diversify=diversify)
            return Served(request_id, None, None, self.recommender.index.encoder_version, int(user_id), items, profile)
        arm = self.experiment.assign(user_id)
        profile, items, version = self.recommend_arm(arm, user_id, n, blocked, history)
        return Served(request_id, self.experiment.name, arm.name, version, int(user_id), items, profile)
