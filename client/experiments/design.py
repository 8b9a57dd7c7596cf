"""An experiment: named arms with weights, each arm naming what differs (encoder version, recall channels and
their weights, MMR on/off), and a deterministic assignment of users to arms.

Assignment hashes `salt:user_id` with SHA-256 into [0, 1) and walks the cumulative weights, so a user always
lands in the same arm of an experiment (across processes, machines and restarts), and two experiments with
different salts assign independently. An A/A test is two arms with the same settings.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from bert_recsys.client.recall import RecallChannel

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ExperimentError(ValueError):
    """An experiment definition that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Arm:
    """One arm. Fields left at None use the recommender's own settings."""

    name: str
    weight: float = 1.0
    encoder_version: int | None = None                    # serve with the index embedded by this version
    channels: tuple[RecallChannel, ...] | None = None      # recall channels used (None = all)
    channel_weights: dict | None = None                    # blend weight per channel (None = the recommender's)
    diversify: bool = True                                 # MMR and the per-category cap

    def __post_init__(self):
        if not NAME.match(self.name or ""):
            raise ExperimentError(f"arm name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if not (self.weight > 0 and self.weight < float("inf")):
            raise ExperimentError(f"arm {self.name}: weight must be a positive number, not {self.weight!r}")
        if self.encoder_version is not None and (not isinstance(self.encoder_version, int) or self.encoder_version < 1):
            raise ExperimentError(f"arm {self.name}: encoder_version must be a version number >= 1")
        try:
            if self.channels is not None:
                channels = tuple(RecallChannel.parse_many(self.channels))
                if not channels:
                    raise ExperimentError(f"arm {self.name}: channels must not be empty")
                object.__setattr__(self, "channels", channels)
            if self.channel_weights is not None:
                object.__setattr__(self, "channel_weights",
                                   {RecallChannel(k): float(v) for k, v in self.channel_weights.items()})
        except ValueError as error:
            if isinstance(error, ExperimentError):
                raise
            raise ExperimentError(f"arm {self.name}: {error}") from None

    def to_json(self) -> dict:
        return {"name": self.name, "weight": self.weight, "encoder_version": self.encoder_version,
                "channels": [c.value for c in self.channels] if self.channels is not None else None,
                "channel_weights": ({c.value: w for c, w in self.channel_weights.items()}
                                    if self.channel_weights is not None else None),
                "diversify": self.diversify}


@dataclass(frozen=True)
class Experiment:
    """Arms in order; the first is the control every other arm is compared with."""

    name: str
    arms: tuple[Arm, ...]
    salt: str = ""                      # default: the experiment's name
    metric: str = "ctr"                 # the primary metric the test and the sample size are about
    alpha: float = 0.05
    mde: float = 0.10                   # minimum detectable relative lift, for "sample size still needed"
    power: float = 0.80
    description: str = ""
    catalog_size: int | None = None     # for coverage; None: the items shown in any arm
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not NAME.match(self.name or ""):
            raise ExperimentError(f"experiment name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        arms = tuple(a if isinstance(a, Arm) else Arm(**a) for a in self.arms)
        if len(arms) < 2:
            raise ExperimentError(f"experiment {self.name}: needs at least two arms (A/A, A/B or A/B/n)")
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ExperimentError(f"experiment {self.name}: arm names repeat: {names}")
        object.__setattr__(self, "arms", arms)
        object.__setattr__(self, "salt", self.salt or self.name)
        if self.metric not in METRICS:
            raise ExperimentError(f"experiment {self.name}: metric must be one of {METRICS}, not {self.metric!r}")
        if not 0 < self.alpha < 0.5:
            raise ExperimentError(f"experiment {self.name}: alpha must be within (0, 0.5)")
        if not self.mde > 0 or not 0 < self.power < 1:
            raise ExperimentError(f"experiment {self.name}: mde must be > 0 and power within (0, 1)")

    @property
    def control(self) -> Arm:
        return self.arms[0]

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ExperimentError(f"experiment {self.name} has no arm {name!r} (arms: {[a.name for a in self.arms]})")

    def assign(self, user_id) -> Arm:
        return self.arms[bucket(self.salt, user_id, [a.weight for a in self.arms])]

    def to_json(self) -> dict:
        return {"name": self.name, "salt": self.salt, "metric": self.metric, "alpha": self.alpha, "mde": self.mde,
                "power": self.power, "description": self.description, "catalog_size": self.catalog_size,
                "arms": [a.to_json() for a in self.arms], **({"extra": self.extra} if self.extra else {})}

    @classmethod
    def from_json(cls, data: dict) -> "Experiment":
        if not isinstance(data, dict):
            raise ExperimentError("an experiment is a JSON object")
        known = {"name", "salt", "metric", "alpha", "mde", "power", "description", "catalog_size", "arms", "extra"}
        unknown = set(data) - known
        if unknown:
            raise ExperimentError(f"unknown experiment fields: {sorted(unknown)}")
        arms = data.get("arms")
        if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
            raise ExperimentError("`arms` must be a list of objects")
        try:
            return cls(**{**data, "arms": tuple(Arm(**a) for a in arms)})
        except TypeError as error:
            raise ExperimentError(f"experiment fields: {error}") from None

    @classmethod
    def parse(cls, text: str) -> "Experiment":
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as error:
            raise ExperimentError(f"experiment JSON: {error}") from None


METRICS = ("ctr", "conversion_rate")


def unit_interval(salt: str, user_id) -> float:
    """SHA-256 of `salt:user_id`, as a number in [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def bucket(salt: str, user_id, weights: Sequence[float]) -> int:
    """The index of the arm `user_id` falls in, for arms with these relative weights."""
    u = unit_interval(salt, user_id) * sum(weights)
    edge = 0.0
    for i, weight in enumerate(weights):
        edge += weight
        if u < edge:
            return i
    return len(weights) - 1
