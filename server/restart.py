"""When `bert-recsys serve` (`make serve`) restarts a tritonserver that died, and when it gives up: a pure decision.

The launcher restarts a crashed server after a backoff that doubles with each recent crash (1 s, 2 s, 4 s...), and
gives up, exiting non-zero, when more than `max_restarts` crashes fall within `window_s`: a crash loop is an
error to look at, not a spin. In the container images tritonserver runs without this launcher (docker/serve.sh
execs it) and the orchestrator restarts the container, so the two never both restart one server
(docs/production.md, "Who restarts Triton").
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5        # restarts allowed within window_s; 0: never restart
    window_s: float = 300.0
    backoff_s: float = 1.0       # the first restart's delay, doubled for each further crash within the window
    max_backoff_s: float = 30.0

    def __post_init__(self):
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {self.max_restarts}")
        if self.window_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError(f"need window_s > 0 and 0 <= backoff_s <= max_backoff_s, not {self}")


def restart_delay(policy: RestartPolicy, crashes: list[float] | tuple[float, ...], now: float) -> float | None:
    """Seconds to wait before restarting after the crash at `now` (the last of `crashes`, monotonic times, oldest
    first), or None: give up, `max_restarts` restarts within the window have not helped."""
    recent = [t for t in crashes if now - t <= policy.window_s]
    if not recent or recent[-1] != now:
        raise ValueError("the crash at `now` must be the last of `crashes`")
    if len(recent) > policy.max_restarts:
        return None
    return min(policy.max_backoff_s, policy.backoff_s * 2 ** (len(recent) - 1))
