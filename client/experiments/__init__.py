"""Experiments: arms assigned by hashing the user id, impression/click/conversion events in SQLite, a report
that can be read at any time (always-valid test), and a simulator that replays MovieLens behaviour.

    design.py    Experiment, Arm, deterministic assignment
    events.py    EventStore (SQLite WAL): validated, idempotent, all-or-nothing appends
    stats.py     pure statistics: delta-method ratios, mSPRT, power, sample size, non-inferiority
    serving.py   ExperimentRecommender: the arm's list with request id, arm and encoder version
    report.py    per-arm metrics and comparisons; Markdown, JSON, plots
    simulate.py  A/A, injected lift and real-arm replays on MovieLens
"""
from bert_recsys.client.experiments.design import Arm, Experiment, ExperimentError
from bert_recsys.client.experiments.events import AppendResult, EventError, EventStore, EventType
from bert_recsys.client.experiments.serving import ExperimentRecommender, Served

__all__ = ["Arm", "Experiment", "ExperimentError", "EventStore", "EventError", "EventType", "AppendResult",
           "ExperimentRecommender", "Served"]
