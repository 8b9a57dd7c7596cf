"""What a launcher owns, and how it ends it: the tritonserver process it started, that server's Python-backend
stubs, and their shared-memory regions in /dev/shm.

Ownership is proven, never guessed. Each server gets a shared-memory prefix of its own
(`triton_python_backend_shm_region_<server id>_`, passed to the Python backend as `shm-region-prefix-name`).
Every stub carries its region name on its command line, so "the processes whose command line holds this prefix"
are exactly that server's stubs, and "the /dev/shm files that start with it" are exactly its regions. The server
process itself is recognised by pid *and* start time, so a recycled pid is never taken for it.

A `ServerRecord` is written to the run directory while a server runs. A launcher that was killed cannot clean up
after itself; the next launcher to start finds its record (the launcher it names is gone) and reaps what is left.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bert_recsys import logs

log = logs.get("server")

SHM_DIR = Path("/dev/shm")
# Triton's own default prefix; ours adds the server id, so tools that look for Triton's regions still see ours.
SHM_PREFIX_BASE = "triton_python_backend_shm_region_"
STUB_BINARY = "triton_python_backend_stub"


def shm_prefix_for(server_id: str) -> str:
    return f"{SHM_PREFIX_BASE}{server_id}_"


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks since boot) from /proc/PID/stat, zombies included; None if
    the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the comm may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone or
    a zombie. Together with the pid it names one process for good: pids are recycled, start times are not."""
    stat = proc_stat(pid)
    return None if stat is None or stat[0] in ("Z", "X") else stat[2]


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> "ProcessId | None":
        ticks = start_ticks(pid)
        return None if ticks is None else cls(pid, ticks)

    def alive(self) -> bool:
        return start_ticks(self.pid) == self.start_ticks


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub: the model version and instance it runs."""

    pid: int
    model: str
    version: str
    instance: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.version, self.instance

    @property
    def serves(self) -> bool:
        """An instance's stub (`encoder_0_0`). At each load the backend also starts a short-lived stub named after
        the model itself (`encoder`), which exits by design once the model is set up."""
        return self.instance != self.model


def parse_stub_argv(pid: int, argv: list[str]) -> Stub | None:
    """The stub's command line: stub MODEL_DIR/VERSION/model.py SHM_REGION SHM_SIZE SHM_GROWTH PARENT_PID
    PYTHON_LIB IPC_HANDLE INSTANCE_NAME RUNTIME_MODELDIR (Triton 2.51's Python backend)."""
    if len(argv) < 9 or not argv[0].endswith(STUB_BINARY):
        return None
    model_py = Path(argv[1])
    return Stub(pid, model_py.parent.parent.name, model_py.parent.name, argv[8])


def _cmdlines():
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if raw:  # zombies and kernel threads have none
            yield int(entry.name), raw.decode("utf-8", "replace").rstrip("\0").split("\0")


def stubs(shm_prefix: str) -> list[Stub]:
    """The live stubs of the server that uses `shm_prefix`."""
    found = []
    for pid, argv in _cmdlines():
        if any(arg.startswith(shm_prefix) for arg in argv):
            stub = parse_stub_argv(pid, argv)
            if stub is not None:
                found.append(stub)
    return found


def processes_with(marker: str) -> list[int]:
    return [pid for pid, argv in _cmdlines() if any(marker in arg for arg in argv)]


def shm_regions(shm_prefix: str) -> list[Path]:
    try:
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(shm_prefix))
    except OSError:
        return []


@dataclass(frozen=True)
class ServerRecord:
    """A running server as its launcher left it on disk: enough for anyone to end it and all it owns."""

    server_id: str
    server: ProcessId
    launcher: ProcessId
    shm_prefix: str
    repository: str
    started_at: float

    def owned_pids(self) -> list[int]:
        pids = set(processes_with(self.shm_prefix))
        if self.server.alive():
            pids.add(self.server.pid)
        return sorted(pids)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ServerRecord":
        data = json.loads(text)
        return cls(data["server_id"], ProcessId(**data["server"]), ProcessId(**data["launcher"]),
                   data["shm_prefix"], data["repository"], float(data["started_at"]))


@dataclass
class Reaped:
    terminated: int = 0   # processes that ended on SIGTERM within the grace period
    killed: int = 0       # processes that needed SIGKILL
    shm_removed: int = 0  # /dev/shm regions removed

    def __bool__(self) -> bool:
        return bool(self.terminated or self.killed or self.shm_removed)


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(record: ServerRecord, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = record.owned_pids()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def reap(record: ServerRecord, grace_s: float = 5.0) -> Reaped:
    """Ends every process the record's server owns (SIGTERM, at most `grace_s` to go, then SIGKILL) and removes
    its shared-memory regions. Touches nothing else. Safe to call any number of times."""
    result = Reaped()
    pids = record.owned_pids()
    if pids:
        _signal_all(pids, signal.SIGTERM)
        left = _wait_gone(record, grace_s)
        result.terminated = len(pids) - len(left)
        if left:
            # Stubs blocked on a dead server's shared-memory queue do not act on SIGTERM (seen here).
            _signal_all(left, signal.SIGKILL)
            still = _wait_gone(record, 10.0)
            result.killed = len(left) - len(still)
            if still:
                log.error("server %s: processes %s survived SIGKILL", record.server_id, still)
    for region in shm_regions(record.shm_prefix):
        try:
            region.unlink()
            result.shm_removed += 1
        except FileNotFoundError:
            pass
    return result


class RunDirectory:
    """One JSON record per running server, written by its launcher and removed by it once all is ended."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _file(self, server_id: str) -> Path:
        return self.path / f"{server_id}.json"

    def write(self, record: ServerRecord) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        incoming = self.path / f".{record.server_id}.incoming"
        incoming.write_text(record.to_json())
        os.replace(incoming, self._file(record.server_id))

    def remove(self, server_id: str) -> None:
        self._file(server_id).unlink(missing_ok=True)

    def records(self) -> list[ServerRecord]:
        found = []
        for file in sorted(self.path.glob("*.json")) if self.path.exists() else []:
            try:
                found.append(ServerRecord.from_json(file.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("ignoring unreadable server record %s: %s", file, error)
        return found

    def reap_orphans(self) -> list[tuple[ServerRecord, Reaped]]:
        """Reaps the servers whose launcher is gone (killed before it could stop them); leaves the servers of
        live launchers alone."""
        done = []
        for record in self.records():
            if record.launcher.alive():
                continue
            result = reap(record)
            if result:
                log.warning("reaped what a dead launcher left of server %s (%s): %d terminated, %d killed, "
                            "%d shared-memory regions removed", record.server_id, record.repository,
                            result.terminated, result.killed, result.shm_removed)
            self.remove(record.server_id)
            done.append((record, result))
        return done
