"""The event store: impressions, clicks and conversions in SQLite (WAL), appended whole or not at all.

Schema (the same columns fit a warehouse table; `shown` is the impression's list, one row per position):

    experiments(name TEXT PRIMARY KEY, definition TEXT JSON, created_at REAL)
    events(event_id TEXT PRIMARY KEY,        -- the sender's id: a retried or late duplicate is ignored
           type TEXT,                        -- impression | click | conversion
           ts REAL,                          -- when it happened (unix seconds, sender's clock)
           received_at REAL,                 -- when the store took it
           request_id TEXT,                  -- the recommendation it belongs to (impressions: one per request)
           user_id TEXT,
           experiment TEXT, arm TEXT,        -- impressions inside an experiment (NULL outside one)
           encoder_version INTEGER,          -- impressions: the encoder version that produced the list
           item_id INTEGER,                  -- clicks and conversions: the item acted on
           n_items INTEGER,                  -- impressions: the length of the list in `shown`
           value REAL)                       -- conversions: an optional value (e.g. revenue)
    shown(request_id TEXT, position INTEGER, item_id INTEGER, PRIMARY KEY (request_id, position))

A click or conversion joins its impression by (request_id, item_id); it may arrive before the impression
(late impressions are counted once they come). Repeated clicks on one shown item count once. Every `append`
is one transaction: a batch with one malformed event is refused whole, with the reason, and a process killed
mid-write leaves either the whole batch or none of it (WAL; tested by killing a writer).
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from bert_recsys.client.experiments.design import Experiment, ExperimentError

MAX_ID = 128
MAX_ITEMS = 1000
FUTURE_SLACK_S = 86400.0  # a timestamp more than a day ahead of the store's clock is refused

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY, definition TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    type TEXT NOT NULL CHECK (type IN ('impression', 'click', 'conversion')),
    ts REAL NOT NULL, received_at REAL NOT NULL,
    request_id TEXT NOT NULL, user_id TEXT NOT NULL,
    experiment TEXT, arm TEXT, encoder_version INTEGER,
    item_id INTEGER, n_items INTEGER, value REAL);
CREATE UNIQUE INDEX IF NOT EXISTS one_impression_per_request ON events (request_id) WHERE type = 'impression';
CREATE INDEX IF NOT EXISTS actions ON events (request_id, item_id) WHERE type != 'impression';
CREATE INDEX IF NOT EXISTS impressions_by_experiment ON events (experiment, ts) WHERE type = 'impression';
CREATE TABLE IF NOT EXISTS shown (
    request_id TEXT NOT NULL, position INTEGER NOT NULL, item_id INTEGER NOT NULL,
    PRIMARY KEY (request_id, position));
CREATE INDEX IF NOT EXISTS shown_items ON shown (request_id, item_id);
"""


class EventType(StrEnum):
    IMPRESSION = "impression"
    CLICK = "click"
    CONVERSION = "conversion"


class EventError(ValueError):
    """A batch refused whole: `reasons` lists each bad event as "event <i> (<id>): <reason>"."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""))
        self.reasons = reasons


@dataclass(frozen=True)
class Event:
    event_id: str
    type: EventType
    ts: float
    request_id: str
    user_id: str
    experiment: str | None = None
    arm: str | None = None
    encoder_version: int | None = None
    item_id: int | None = None
    items: tuple[int, ...] = ()
    value: float | None = None


@dataclass(frozen=True)
class AppendResult:
    accepted: int
    duplicates: int

    def to_json(self) -> dict:
        return {"accepted": self.accepted, "duplicates": self.duplicates}


# ---- validation: one pure function per event ---------------------------------------------------------------
FIELDS = {"event_id", "type", "ts", "request_id", "user_id", "experiment", "arm", "encoder_version", "item_id",
          "items", "value", "position"}


def _ident(raw: dict, name: str, required: bool = True) -> str | None:
    value = raw.get(name)
    if value is None:
        if required:
            raise ValueError(f"`{name}` is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"`{name}` must be a string or an integer")
    value = str(value)
    if not 0 < len(value) <= MAX_ID:
        raise ValueError(f"`{name}` must be 1-{MAX_ID} characters")
    return value


def _int(raw: dict, name: str, minimum: int, required: bool) -> int | None:
    value = raw.get(name)
    if value is None:
        if required:
            raise ValueError(f"`{name}` is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}")
    return value


def parse_event(raw, experiments: dict[str, Experiment], now: float) -> Event:
    """One event from its JSON form, or ValueError naming the field."""
    if not isinstance(raw, dict):
        raise ValueError("an event is a JSON object")
    unknown = set(raw) - FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    try:
        kind = EventType(raw.get("type"))
    except ValueError:
        raise ValueError(f"`type` must be one of {[t.value for t in EventType]}") from None
    ts = raw.get("ts", now)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0:
        raise ValueError("`ts` must be a positive number of unix seconds")
    if ts > now + FUTURE_SLACK_S:
        raise ValueError("`ts` is more than a day in the future")
    experiment, arm = _ident(raw, "experiment", False), _ident(raw, "arm", False)
    if (experiment is None) != (arm is None):
        raise ValueError("`experiment` and `arm` go together")
    if experiment is not None:
        if experiment not in experiments:
            raise ValueError(f"experiment {experiment!r} is not registered")
        try:
            experiments[experiment].arm(arm)
        except ExperimentError as error:
            raise ValueError(str(error)) from None
    event = dict(event_id=_ident(raw, "event_id"), type=kind, ts=float(ts), request_id=_ident(raw, "request_id"),
                 user_id=_ident(raw, "user_id"), experiment=experiment, arm=arm,
                 encoder_version=_int(raw, "encoder_version", 1, False))
    if kind is EventType.IMPRESSION:
        items = raw.get("items")
        if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise ValueError(f"an impression's `items` must be a list of 1-{MAX_ITEMS} integer item ids, in the order shown")
        if len(set(items)) != len(items):
            raise ValueError("an impression's `items` repeat an item")
        for name in ("item_id", "value", "position"):
            if raw.get(name) is not None:
                raise ValueError(f"an impression has `items`, not `{name}`")
        return Event(**event, items=tuple(items))
    if raw.get("items") is not None:
        raise ValueError(f"a {kind.value} names one `item_id`, not `items`")
    value = raw.get("value")
    if value is not None:
        if kind is not EventType.CONVERSION:
            raise ValueError("only a conversion carries a `value`")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError("`value` must be a finite number")
    _int(raw, "position", 0, False)  # accepted for the sender's records; the impression's position counts
    return Event(**event, item_id=_int(raw, "item_id", 0, True), value=value)


# ---- the store -----------------------------------------------------------------------------------------------
class EventStore:
    """One SQLite file in WAL mode. Thread-safe (one connection, one lock); several processes may append."""

    def __init__(self, path: Path, clock=time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit (one per POSTed batch) is fsynced before the gateway answers 2xx, so an acknowledged event
        # survives a power loss too; NORMAL in WAL mode only survives a crash of the process.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._experiments = self._read_experiments()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- experiments ----
    def _read_experiments(self) -> dict[str, Experiment]:
        rows = self._db.execute("SELECT definition FROM experiments").fetchall()
        return {e.name: e for e in (Experiment.from_json(json.loads(d)) for (d,) in rows)}

    def register(self, experiment: Experiment) -> None:
        """Records the experiment's definition; registering the same definition again is a no-op, another one
        under the same name is refused (its events would mean something else)."""
        with self._lock:
            self._experiments = self._read_experiments()
            known = self._experiments.get(experiment.name)
            if known is not None:
                if known.to_json() != experiment.to_json():
                    raise ExperimentError(f"experiment {experiment.name} is registered with another definition; "
                                          "use a new name")
                return
            self._db.execute("INSERT INTO experiments VALUES (?, ?, ?)",
                             (experiment.name, json.dumps(experiment.to_json()), self.clock()))
            self._experiments[experiment.name] = experiment

    def experiment(self, name: str) -> Experiment:
        with self._lock:
            if name not in self._experiments:
                self._experiments = self._read_experiments()
            if name not in self._experiments:
                raise ExperimentError(f"no experiment {name!r} in {self.path} (registered: {sorted(self._experiments)})")
            return self._experiments[name]

    # ---- events ----
    def append(self, raw_events: Iterable) -> AppendResult:
        """Validates every event, then writes them in one transaction. Raises EventError (nothing written) if
        any is malformed; events already stored (same event_id) are counted as duplicates."""
        raw_events = list(raw_events)
        with self._lock:
            now = self.clock()
            named = {raw.get("experiment") for raw in raw_events if isinstance(raw, dict)}
            if any(isinstance(n, str) and n not in self._experiments for n in named):
                self._experiments = self._read_experiments()  # another process may have registered it since
            events, reasons = [], []
            for i, raw in enumerate(raw_events):
                try:
                    events.append(parse_event(raw, self._experiments, now))
                except ValueError as error:
                    label = raw.get("event_id") if isinstance(raw, dict) else None
                    reasons.append(f"event {i}" + (f" ({label})" if label is not None else "") + f": {error}")
            if reasons:
                raise EventError(reasons)
            ids = [e.event_id for e in events]
            if len(set(ids)) != len(ids):
                raise EventError(["the batch repeats an event_id"])
            return self._write(events, now)

    def _write(self, events: list[Event], now: float) -> AppendResult:
        accepted = 0
        cursor = self._db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for e in events:
                cursor.execute(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.event_id, e.type.value, e.ts, now, e.request_id, e.user_id, e.experiment, e.arm,
                     e.encoder_version, e.item_id, len(e.items) if e.type is EventType.IMPRESSION else None, e.value))
                if cursor.rowcount == 1:
                    accepted += 1
                    if e.type is EventType.IMPRESSION:
                        cursor.executemany("INSERT INTO shown VALUES (?, ?, ?)",
                                           [(e.request_id, p, item) for p, item in enumerate(e.items)])
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        return AppendResult(accepted, len(events) - accepted)

    # ---- reading ----
    def slots(self, experiment: str | None = None, since: float | None = None) -> "Slots":
        """Every shown (impression, position) with whether it was clicked or converted, oldest impression first.
        `experiment` None: all impressions (inside experiments or not); `since`: impressions at or after it."""
        where, args = ["type = 'impression'"], []
        if experiment is not None:
            where.append("experiment = ?"), args.append(experiment)
        if since is not None:
            where.append("ts >= ?"), args.append(since)
        # Only the actions of the impressions asked for are aggregated (a rollout's window, one experiment).
        query = f"""
            WITH i AS (SELECT request_id, user_id, arm, encoder_version, ts FROM events WHERE {' AND '.join(where)}),
                 acts AS (SELECT a.request_id, a.item_id, MAX(a.type = 'conversion') AS converted
                          FROM events a JOIN i ON a.request_id = i.request_id
                          WHERE a.type != 'impression' GROUP BY a.request_id, a.item_id)
            SELECT i.request_id, i.user_id, COALESCE(i.arm, ''), COALESCE(i.encoder_version, 0), i.ts, s.position,
                   s.item_id, acts.request_id IS NOT NULL, COALESCE(acts.converted, 0)
            FROM i JOIN shown s ON s.request_id = i.request_id
            LEFT JOIN acts ON acts.request_id = s.request_id AND acts.item_id = s.item_id
            ORDER BY i.ts, i.request_id, s.position"""
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return Slots.from_rows(rows)

    def orphans(self) -> int:
        """Clicks and conversions whose impression never arrived (or named an item it did not show)."""
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM events a LEFT JOIN shown s ON s.request_id = a.request_id AND s.item_id = a.item_id "
                "WHERE a.type != 'impression' AND s.request_id IS NULL").fetchone()
        return count

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT type, COUNT(*) FROM events GROUP BY type").fetchall())


@dataclass(frozen=True)
class Slots:
    """Column arrays, one row per shown item."""

    request_id: np.ndarray
    user_id: np.ndarray
    arm: np.ndarray
    encoder_version: np.ndarray
    ts: np.ndarray
    position: np.ndarray
    item_id: np.ndarray
    clicked: np.ndarray
    converted: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> "Slots":
        columns = list(zip(*rows)) if rows else [()] * 9
        kinds = [object, object, object, np.int64, np.float64, np.int64, np.int64, bool, bool]
        return cls(*(np.array(c, dtype=k) for c, k in zip(columns, kinds)))

    def __len__(self) -> int:
        return len(self.position)

    def take(self, mask) -> "Slots":
        return Slots(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))
