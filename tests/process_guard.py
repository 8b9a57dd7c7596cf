"""The suite's own check that it leaves nothing running: no tritonserver, stub, Locust, perf_analyzer or gateway
process, and no Python-backend shared-memory region, outlives the test session.

How a process is known to be the suite's: at the start of the session a fresh token is put in the environment
(`TEST_SESSION_ENV`). Every process the tests start inherits it, and so does everything those start (Triton's
stubs, Locust's workers), even after it is re-parented to init. So "a live process whose environment holds the
token" is exactly "something this session started", whatever its name.

After each test's teardown the guard notes which such processes are alive and the first test after which each
was seen: a leftover is reported with the test that left it. At the end of the session it gives stragglers a
grace period (a stub notices its server's death within seconds), then ends what is left, removes the regions,
and fails the session.

A sampler thread also records every such process it sees (every 0.25 s): its command line, parent, start time
and the test that was running. The record is written at the end of the session (build/test-processes/<time>.json), so
that a process found later by something outside the suite can be looked up by pid and start time. A recorded
process that still exists at the end as a zombie cannot carry the token any more (its environment is gone): it
is named with its parent, and reaped if its parent is the suite itself.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bert_recsys.server.processes import SHM_DIR, SHM_PREFIX_BASE, proc_stat, start_ticks, shm_regions as regions_with

TEST_SESSION_ENV = "BERT_SERVING_TEST_SESSION"


def marked_processes(token: str, exclude: frozenset[int] = frozenset()) -> dict[int, str]:
    """pid -> command line of every live process (not a zombie) whose environment holds the session token."""
    needle = f"{TEST_SESSION_ENV}={token}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if start_ticks(int(entry.name)) is None:  # gone, or a zombie waiting for its parent: nothing runs
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return found


def boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


@dataclass
class Started:
    """A process the suite started, as the sampler first saw it."""
    pid: int
    start_ticks: int
    parent: int
    started_at: float       # unix seconds
    command: str
    during: str             # the test that was running ("" between tests)


def shm_regions() -> set[str]:
    """Every Python-backend region in /dev/shm, whichever server made it."""
    return {p.name for p in regions_with(SHM_PREFIX_BASE)}


@dataclass
class Leftover:
    pid: int
    command: str
    first_seen_after: str  # the test after whose teardown it was first seen alive ("" if only at the end)


@dataclass
class ProcessGuard:
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    exclude: frozenset[int] = frozenset()
    regions_before: set[str] = field(default_factory=shm_regions)
    first_seen: dict[int, str] = field(default_factory=dict)
    started: dict[tuple[int, int], Started] = field(default_factory=dict)
    current: str = ""       # the running test, set by the conftest's hooks
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def install(self, sample_every_s: float | None = 0.25) -> None:
        os.environ[TEST_SESSION_ENV] = self.token
        self.exclude = frozenset({os.getpid()})
        if sample_every_s:
            threading.Thread(target=self._sample_until_stopped, args=(sample_every_s,), name="process-guard-sampler",
                             daemon=True).start()

    def sample(self) -> None:
        """Record every marked process not seen before (keyed by pid and start time: pids are reused)."""
        ticks, btime = os.sysconf("SC_CLK_TCK"), None
        for pid, command in marked_processes(self.token, self.exclude).items():
            stat = proc_stat(pid)
            if stat is None or (pid, stat[2]) in self.started:
                continue
            btime = boot_time() if btime is None else btime
            with self._lock:
                self.started.setdefault((pid, stat[2]), Started(pid, stat[2], stat[1], round(btime + stat[2] / ticks, 2),
                                                                command, self.current))

    def _sample_until_stopped(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the sampler must never take the session down
                pass

    def stop_sampling(self) -> None:
        self._stop.set()

    def lingering(self) -> list[tuple[Started, str]]:
        """Recorded processes that still exist, with their state now (e.g. "Z" for a zombie): a zombie the suite
        itself is the parent of is reaped here; others are left to their parent, and named."""
        out = []
        with self._lock:
            recorded = list(self.started.values())
        for started in recorded:
            stat = proc_stat(started.pid)
            if stat is None or stat[2] != started.start_ticks:
                continue
            state, parent, _ = stat
            if state == "Z" and parent == os.getpid():
                try:
                    os.waitpid(started.pid, os.WNOHANG)
                    continue
                except ChildProcessError:
                    pass
            out.append((started, f"{state} (parent {parent})"))
        return out

    def write_record(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            rows = sorted(self.started.values(), key=lambda s: s.started_at)
        path.write_text(json.dumps([s.__dict__ for s in rows], indent=1) + "\n")

    def observe(self, test_id: str) -> None:
        for pid in marked_processes(self.token, self.exclude):
            self.first_seen.setdefault(pid, test_id)

    def leftovers(self, grace_s: float) -> tuple[list[Leftover], set[str]]:
        """What is still alive after up to `grace_s` seconds, and the regions created during the session that
        are still there."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = marked_processes(self.token, self.exclude)
            regions = shm_regions() - self.regions_before
            if (not alive and not regions) or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        return [Leftover(pid, cmd, self.first_seen.get(pid, "")) for pid, cmd in sorted(alive.items())], regions

    @staticmethod
    def clean(leftovers: list[Leftover], regions: set[str]) -> None:
        for leftover in leftovers:
            try:
                os.kill(leftover.pid, signal.SIGKILL)
            except OSError:
                pass
        for name in regions:
            try:
                (SHM_DIR / name).unlink()
            except OSError:
                pass


def report_lingering(lingering: list[tuple[Started, str]]) -> str:
    lines = ["processes the suite started still exist (not running: they cannot be ended, only reaped by their parent):"]
    for started, state in lingering:
        lines.append(f"  pid {started.pid}, state {state}, started {time.strftime('%H:%M:%S', time.localtime(started.started_at))}"
                     f" by pid {started.parent} during {started.during or 'no test'}: {started.command[:200]}")
    return "\n".join(lines)


def report(leftovers: list[Leftover], regions: set[str]) -> str:
    lines = ["the test session left processes or shared memory behind (ended and removed now):"]
    for leftover in leftovers:
        where = f"first seen after {leftover.first_seen_after}" if leftover.first_seen_after else "seen only at the end"
        lines.append(f"  pid {leftover.pid} ({where}): {leftover.command[:300]}")
    lines.extend(f"  /dev/shm/{name}" for name in sorted(regions))
    return "\n".join(lines)
