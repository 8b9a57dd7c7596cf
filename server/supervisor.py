"""Detects a Python-backend model whose stub died, and brings the model back without restarting the server.

Why this exists: when a stub dies (OOM killer, segfault in a native library, a stray `kill`), Triton 2.51 keeps
reporting the model, the server and the ensembles *ready*, and answers every request for that model with
`Stub process '<instance>' is not healthy` for as long as the server runs (measured here: 60 s of failures, no
recovery). A plain `load` of the unchanged model does nothing. What works is unload, then load: readiness turns
false while the model cannot serve (so a load balancer or a Kubernetes readiness probe takes the server out), and
loading the composing model brings its ensembles back with it.

How a death is told from a normal unload (a rollout unloads versions, and a reload replaces stubs): a stub
instance (model, version, instance name) that has been gone for `grace_s` while Triton still lists that model
version as READY is dead. A reload starts the new stubs before the old ones exit, and an unloaded version is no
longer READY, so neither looks like a death (recorded every 50 ms through a whole rollout). Only instance stubs
count: the stub the backend starts under the model's own name at each load exits by design.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from bert_recsys import logs
from bert_recsys.server import processes

log = logs.get("server")

InstanceKey = tuple[str, str, str]  # (model, version, instance name)


@dataclass
class Watch:
    """What the supervisor remembers between two looks: every stub instance seen, and since when each missing
    one has been missing."""

    known: set[InstanceKey] = field(default_factory=set)
    missing_since: dict[InstanceKey, float] = field(default_factory=dict)


def overdue(watch: Watch, alive: set[InstanceKey], now: float, grace_s: float) -> list[InstanceKey]:
    """Updates `watch` with the instances alive now; returns those missing for at least `grace_s`."""
    watch.known |= alive
    for key in alive:
        watch.missing_since.pop(key, None)
    for key in watch.known - alive:
        watch.missing_since.setdefault(key, now)
    return sorted(key for key, since in watch.missing_since.items() if now - since >= grace_s)


def dead_models(watch: Watch, overdue_keys: list[InstanceKey], ready: set[tuple[str, str]]) -> list[str]:
    """Of the overdue instances, those whose model version Triton still calls READY are dead; the others were
    unloaded on purpose and are forgotten. -> the models to repair, each once."""
    dead = []
    for key in overdue_keys:
        model, version, _ = key
        if (model, version) in ready:
            if model not in dead:
                dead.append(model)
        else:
            watch.known.discard(key)
            watch.missing_since.pop(key, None)
    return dead


@dataclass(frozen=True)
class Repair:
    model: str
    instances: tuple[str, ...]
    detected_at: float        # time.time() when the death was established
    repaired_at: float | None  # when the model was READY again; None if the repair failed
    error: str = ""


class ModelSupervisor:
    """A thread beside one server: looks at its stubs every `interval_s`, repairs models whose stub died.
    At most `max_repairs` repairs per model within `window_s`: a model that keeps dying is left unloaded (not
    ready), so the failure is visible instead of looping."""

    def __init__(self, shm_prefix: str, grpc_url: str, admin_headers: dict[str, str], interval_s: float = 0.25,
                 grace_s: float = 0.75, max_repairs: int = 5, window_s: float = 600.0):
        self.shm_prefix = shm_prefix
        self.grpc_url = grpc_url
        self.admin_headers = admin_headers
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.max_repairs = max_repairs
        self.window_s = window_s
        self.repairs: list[Repair] = []
        self._watch = Watch()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    # ---- Triton ------------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import tritonclient.grpc as grpcclient

            self._client = grpcclient.InferenceServerClient(self.grpc_url)
        return self._client

    def _states(self) -> dict[tuple[str, str], str]:
        index = self.client.get_model_repository_index(headers=self.admin_headers)
        return {(m.name, m.version): m.state for m in index.models}

    def _ready_versions(self) -> set[tuple[str, str]]:
        return {key for key, state in self._states().items() if state == "READY"}

    def _repair(self, model: str, instances: tuple[str, ...], detected_at: float) -> Repair:
        """unload, load, then load whatever else was READY before and is not now (its ensembles)."""
        before = {name for (name, _), state in self._states().items() if state == "READY"}
        try:
            self.client.unload_model(model, headers=self.admin_headers, client_timeout=300)
            self.client.load_model(model, headers=self.admin_headers, client_timeout=900)
            for name in sorted(before - {n for (n, _), s in self._states().items() if s == "READY"}):
                self.client.load_model(name, headers=self.admin_headers, client_timeout=900)
        except Exception as error:  # the server may be going down, or the model may not load again
            return Repair(model, instances, detected_at, None, f"{type(error).__name__}: {error}")
        return Repair(model, instances, detected_at, time.time())

    def _gave_up_on(self, model: str, now: float) -> bool:
        recent = [r for r in self.repairs if r.model == model and now - r.detected_at <= self.window_s]
        return len(recent) >= self.max_repairs

    # ---- the loop ----------------------------------------------------------------------------------
    def check_once(self) -> list[Repair]:
        alive = {stub.key for stub in processes.stubs(self.shm_prefix) if stub.serves}
        late = overdue(self._watch, alive, time.monotonic(), self.grace_s)
        if not late:
            return []
        done = []
        for model in dead_models(self._watch, late, self._ready_versions()):
            instances = tuple(sorted(i for m, _, i in late if m == model))
            detected = time.time()
            if self._gave_up_on(model, detected):
                log.error("model %s: stub died again (%s); %d repairs in %.0f s, leaving it unloaded",
                          model, ", ".join(instances), self.max_repairs, self.window_s)
                try:
                    self.client.unload_model(model, headers=self.admin_headers, client_timeout=300)
                except Exception as error:
                    log.error("model %s: unload failed: %s", model, error)
                continue
            log.error("model %s: stub process of %s died; Triton still calls it ready. Reloading it",
                      model, ", ".join(instances))
            repair = self._repair(model, instances, detected)
            if repair.repaired_at is None:
                log.error("model %s: repair failed: %s", model, repair.error)
            else:
                log.warning("model %s: serving again after %.2f s", model, repair.repaired_at - detected)
            self.repairs.append(repair)
            done.append(repair)
            for key in [k for k in self._watch.known if k[0] == model]:  # new stubs, new pids: learn them afresh
                self._watch.known.discard(key)
                self._watch.missing_since.pop(key, None)
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception as error:  # never let the watcher die silently; the server may be stopping
                if not self._stop.is_set():
                    log.warning("supervisor: %s: %s", type(error).__name__, error)

    def start(self) -> "ModelSupervisor":
        self.check_once()  # the first look before returning: a stub that dies right after start is still seen
        self._thread = threading.Thread(target=self._run, name="triton-model-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._client is not None:
            self._client.close()
            self._client = None
