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
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from server.processes import SHM_DIR, SHM_PREFIX_BASE, shm_regions as regions_with

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
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":  # a zombie waits for its parent to reap it: nothing runs
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return found


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

    def install(self) -> None:
        os.environ[TEST_SESSION_ENV] = self.token
        self.exclude = frozenset({os.getpid()})

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


def report(leftovers: list[Leftover], regions: set[str]) -> str:
    lines = ["the test session left processes or shared memory behind (ended and removed now):"]
    for leftover in leftovers:
        where = f"first seen after {leftover.first_seen_after}" if leftover.first_seen_after else "seen only at the end"
        lines.append(f"  pid {leftover.pid} ({where}): {leftover.command[:300]}")
    lines.extend(f"  /dev/shm/{name}" for name in sorted(regions))
    return "\n".join(lines)
