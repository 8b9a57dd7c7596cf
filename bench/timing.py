"""How the benchmarks time a call: enough runs within a budget, or interleaved blocks so a noisy machine's slow
spells fall on every contender alike."""
from __future__ import annotations

import time


def time_calls(call, budget_s: float, max_runs: int, warmup: int = 3) -> list[float]:
    """Seconds per call of `call()`, after `warmup` untimed calls: at least 5 runs, then until the budget or
    max_runs is spent."""
    for _ in range(warmup):
        call()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (time.perf_counter() - start < budget_s or len(times) < 5):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(calls: dict, rounds: int, per_round: int = 1, skip: int = 0, warmup: int = 2,
                     pause_s: float = 0.1) -> dict[str, list[float]]:
    """Seconds per call for each named call, measured in blocks taken in turns (a block of a, one of b, one of c,
    then again, `rounds` times), so a slow spell of a noisy machine falls on all of them, not on whichever one was
    being measured then.

    Each block starts after `pause_s`, and its first `skip` calls are not counted: ONNX Runtime's and PyTorch's
    worker threads spin-wait a while after a run and would take cores from the next block, and the first calls
    after a switch find the caches holding the other one's data (seen here: GEMMs taken one call each in turn
    ran 1.5-2x slower than back to back, which is how they run inside the model)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            time.sleep(pause_s)
            for index in range(skip + per_round):
                t0 = time.perf_counter()
                call()
                if index >= skip:
                    times[name].append(time.perf_counter() - t0)
    return times
