"""One logging configuration for every CLI of this project (export, model_repository, server, rollout, client,
loadtest, demo): timestamped lines on stderr, one logger per stage. stdout stays free for results (JSON,
tables). Library code only gets loggers; the CLI's `main` calls `configure()` once.

    LOG_LEVEL=DEBUG|INFO|WARNING   threshold (default INFO)
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get(stage: str) -> logging.Logger:
    """The logger of one stage: "export", "rollout", "client", ..."""
    return logging.getLogger(stage)


def configure(level: str | None = None) -> None:
    """Idempotent: a second call (a CLI calling another's main) changes nothing."""
    root = logging.getLogger()
    if any(getattr(handler, "_project", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._project = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    from bert_recsys import env

    root.setLevel((level or env.LOG_LEVEL.get()).upper())
