"""Version rollout on a live tritonserver: stage -> validate -> swap in -> canary -> promote or roll back.

The live repository is served in explicit model-control mode. A new export becomes encoder version N+1 beside
the stable version N:

    encoder/N/, encoder/N+1/      version policy `specific [N, N+1]`
    embed, score                  pinned to N (the stable version, what plain clients get)
    embed_vN, score_vN            pinned to N
    embed_vN+1, score_vN+1        pinned to N+1 (the canary: clients send it `canary_share` of their calls)

Every change to the live directory only *adds* a directory (built aside, renamed into place whole) or
*replaces* a config.pbtxt (os.replace, atomic), then asks Triton to load. No step leaves an ensemble pointing
at a version that is not loaded, so no request fails:
- promote: repoint `embed`/`score` to N+1 while both versions are loaded, switch the catalog index, drain,
  then unload `embed_vN`/`score_vN` and narrow the encoder's policy to [N+1];
- roll back: unload `embed_vN+1`/`score_vN+1`, then narrow the encoder's policy to [N].

Triton's traps, and how they are avoided (tests/integration/test_rollout.py checks each):
- unloading a composing model unloads every ensemble that uses it: the encoder is never unloaded, only its
  version policy is narrowed by a reload;
- poll mode unloads before it loads: the server runs in explicit mode and loads on request;
- the Python stub writes `__pycache__` into version directories, which a polling server takes for a change
  and reloads again: servers started by server/launcher.py turn the stub's bytecode writing off.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.manifest import artifact_problems
from model_repository.render import link_or_copy, pinned_name, write_generation
from server.launcher import ServerError, TritonServer, grpc_admin_headers, on_free_ports
from settings import Settings

Log = Callable[[str], None]


class RolloutRefused(RuntimeError):
    """The new version failed a check before it took any traffic; what was serving is untouched."""


@dataclass(frozen=True)
class RolloutSettings:
    # Validation, on a separate server, before any traffic:
    parity_min_mean_cosine: float = 0.99   # new vs stable version on the golden set (lower it for a retrained model)
    parity_min_cosine: float = 0.95        # ... and for the worst golden sentence
    latency_max_ratio: float = 1.5         # new p50 / stable p50, batch 1, measured interleaved on that server
    latency_samples: int = 40
    # Canary, on the live server, from Triton's metrics:
    canary_seconds: float = 60.0
    canary_min_requests: int = 50          # fewer than this on the canary: not enough evidence, roll back
    canary_max_failure_rate: float = 0.001  # above the stable failure rate by more than this: roll back
    canary_max_latency_ratio: float = 1.5  # canary mean latency / stable mean latency
    canary_latency_slack_ms: float = 2.0   # ... ignoring differences below this (noise at low latency)
    drain_seconds: float = 5.0             # after the switch, before the old version's ensembles go
    runtime: str = "embedded"


# ---- the live repository and the server's admin API --------------------------------------------------
@dataclass
class LiveRepository:
    path: Path
    settings: Settings

    def config(self, model: str) -> mc.ModelConfig:
        return text_format.Parse((self.path / model / "config.pbtxt").read_text(), mc.ModelConfig())

    @property
    def encoder_config(self) -> mc.ModelConfig:
        return self.config(self.settings.models.encoder)

    @property
    def stable(self) -> int:
        """The version `embed` serves (its encoder step's pinned version): the truth, even mid-promotion."""
        steps = self.config(self.settings.models.embed).ensemble_scheduling.step
        pinned = next(step.model_version for step in steps if step.model_name == self.settings.models.encoder)
        return pinned if pinned > 0 else int(self.encoder_config.parameters["export_version"].string_value or 1)

    @property
    def versions(self) -> list[int]:
        return sorted(self.encoder_config.version_policy.specific.versions) or [self.stable]

    @property
    def canary(self) -> int | None:
        newer = [v for v in self.versions if v > self.stable]
        return max(newer) if newer else None

    def version_dir(self, version: int) -> Path:
        return self.path / self.settings.models.encoder / str(version)

    def manifest(self, version: int) -> dict:
        return json.loads((self.version_dir(version) / "manifest.json").read_text())

    @contextmanager
    def lock(self):
        """One rollout at a time per repository."""
        with open(self.path.parent / f".{self.path.name}.rollout.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RolloutRefused(f"another rollout holds the lock on {self.path}") from None
            yield


@dataclass(frozen=True)
class Replica:
    grpc_url: str      # host:port of Triton's gRPC endpoint (model control, readiness)
    metrics_url: str   # host:port of its metrics endpoint


class TritonAdmin:
    """The keyed model-control API and the metrics of every replica serving the live repository (one
    server, or N pods sharing a repository volume). A load goes to one replica at a time, and returns only
    once that replica has loaded it, so at most one replica is switching at any moment.

    Model control goes over gRPC, never HTTP: Triton 2.51's HTTP frontend serves a load request on one of its
    event threads for the whole load, and the inference requests of every connection on that thread wait
    behind it (measured: HTTP `embed` calls stalled for the full 4-5 s of an encoder reload; over gRPC the
    worst call during the same reload took 53 ms)."""

    def __init__(self, replicas: list[Replica], key: str, header: str = "triton-admin-key"):
        import tritonclient.grpc as grpcclient

        if not replicas:
            raise ValueError("no replicas to administer")
        self.replicas = list(replicas)
        self.headers = grpc_admin_headers(key, header)
        self._clients = {r: grpcclient.InferenceServerClient(r.grpc_url) for r in self.replicas}

    @classmethod
    def single(cls, grpc_url: str, metrics_url: str, key: str, header: str = "triton-admin-key") -> "TritonAdmin":
        return cls([Replica(grpc_url, metrics_url)], key, header)

    def _control(self, action: str, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        for replica, client in self._clients.items():
            try:
                if action == "load":
                    client.load_model(model, headers=self.headers, client_timeout=900)
                else:
                    client.unload_model(model, headers=self.headers, client_timeout=900)
            except InferenceServerException as error:
                raise RuntimeError(f"{action} {model} on {replica.grpc_url}: {error.message()}") from None

    def load(self, model: str) -> None:
        self._control("load", model)

    def unload(self, model: str) -> None:
        self._control("unload", model)

    def ready(self, model: str) -> bool:
        """Ready on every replica."""
        try:
            return all(client.is_model_ready(model) for client in self._clients.values())
        except Exception:  # unreachable replica: not ready
            return False

    def metrics(self) -> dict[tuple[str, str], float]:
        """{(metric, model): value} for Triton's per-model counters, summed over replicas, versions, reasons."""
        values: dict[tuple[str, str], float] = {}
        for replica in self.replicas:
            with urllib.request.urlopen(f"http://{replica.metrics_url}/metrics", timeout=10) as response:
                text = response.read().decode()
            for line in text.splitlines():
                if not line.startswith("nv_inference_") or "{" not in line:
                    continue
                name, rest = line.split("{", 1)
                labels, value = rest.rsplit("} ", 1)
                fields = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
                key = (name, fields.get("model", "").strip('"'))
                values[key] = values.get(key, 0.0) + float(value)
        return values


def traffic(before: dict, after: dict, models: list[str]) -> dict:
    """Requests, failure rate and mean latency of a group of models between two metric reads."""
    def delta(metric):
        return sum(after.get((metric, m), 0.0) - before.get((metric, m), 0.0) for m in models)

    success, failure = delta("nv_inference_request_success"), delta("nv_inference_request_failure")
    total = success + failure
    return {"models": models, "requests": int(total), "failures": int(failure),
            "failure_rate": failure / total if total else 0.0,
            "mean_ms": delta("nv_inference_request_duration_us") / total / 1000 if total else 0.0}


# ---- file operations that never leave a half-written model behind ------------------------------------
def _put_dir(source: Path, target: Path) -> None:
    """Copy a directory beside its target, then rename it into place whole."""
    incoming = target.with_name(f".{target.name}.incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        shutil.copytree(source, incoming, copy_function=lambda a, b: link_or_copy(Path(a), Path(b)))
    except BaseException:  # e.g. the disk filled up: nothing half-copied stays in the live repository
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        incoming.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        incoming.rename(target)


def _put_config(source_model_dir: Path, target_model_dir: Path) -> None:
    incoming = target_model_dir / ".config.pbtxt.incoming"
    shutil.copyfile(source_model_dir / "config.pbtxt", incoming)
    os.replace(incoming, target_model_dir / "config.pbtxt")


def _render(live: LiveRepository, version_dirs: dict[int, Path], stable: int, runtime: str, out: Path) -> Path:
    tokenizer_dir = live.path / live.settings.models.tokenizer / "1"
    return write_generation(live.settings, tokenizer_dir, version_dirs, runtime, out, stable=stable)


def _regenerate(live: LiveRepository, versions: list[int], stable: int, runtime: str) -> Path:
    """Configs for `versions` of the live repository, rendered aside (artifacts are hard links)."""
    target = Path(tempfile.mkdtemp(prefix=".generation-", dir=live.path.parent)) / "repository"
    return _render(live, {v: live.version_dir(v) for v in versions}, stable, runtime, target)


# ---- the steps ----------------------------------------------------------------------------------------
def stage(live: LiveRepository, new_export: Path, workdir: Path, rollout: RolloutSettings) -> tuple[Path, int]:
    """A staging repository: the stable version plus the new export as version N+1. Nothing live changes."""
    new_export = Path(new_export)
    problems = artifact_problems(new_export)
    if problems:
        raise RolloutRefused(f"{new_export}: {'; '.join(problems)}")
    manifest = json.loads((new_export / "manifest.json").read_text())
    if not manifest.get("gate", {}).get("passed"):
        raise RolloutRefused(f"{new_export} did not pass the export gate: {manifest.get('gate', {}).get('failures')}")
    if live.canary is not None:
        raise RolloutRefused(f"version {live.canary} is already a canary: promote or roll it back first")
    stable = live.stable
    if manifest["tokenizer"]["sha256"] != live.manifest(stable)["tokenizer"]["sha256"]:
        raise RolloutRefused("the new export uses another tokenizer: serve it from a new repository")
    new_version = max(live.versions) + 1
    try:
        staging = _render(live, {stable: live.version_dir(stable), new_version: new_export}, stable, rollout.runtime,
                          Path(workdir) / "staging")
    except ValueError as error:
        raise RolloutRefused(str(error)) from None
    except OSError as error:  # a full disk above all: the staging copy sits beside the live repository
        copying = f" (while copying {error.filename})" if error.filename else ""
        raise RolloutRefused(f"could not stage {new_export} in {workdir}: {error.strerror or error}{copying}; "
                             "the live repository was not changed") from None
    return staging, new_version


def _log_tail(path: Path, lines: int = 4) -> str:
    """The server log's reason for not loading: its model table's UNAVAILABLE rows, else its last errors."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    table = [" ".join(line.strip("| ").split()) for line in text if line.startswith("|") and "UNAVAILABLE" in line]
    errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
    return " | ".join((table or errors or text)[-lines:])


def validate(staging: Path, settings: Settings, stable: int, new_version: int, golden: list[str],
             rollout: RolloutSettings, log: Log = print) -> dict:
    """Serves the staging repository on a separate server (its own ports); raises RolloutRefused unless the
    new version loads, matches the stable one on the golden set and keeps its latency."""
    from client.triton import RetryPolicy, TritonClient

    server = on_free_ports(settings.server, admin_key="")
    log_file = Path(staging).with_name("validation-server.log")
    log(f"[rollout] validation server on {server.grpc_url}: loading versions {stable} and {new_version}")
    try:
        triton = TritonServer(staging, server, log_file=log_file, startup_timeout_s=600).start()
    except ServerError as error:
        raise RolloutRefused(f"version {new_version} does not load: {error}: {_log_tail(log_file)}") from None
    try:
        client = TritonClient(server.grpc_url, settings=replace(settings, server=server),
                              retry=RetryPolicy(attempts=3), timeout_s=300)
        old = client.embed(golden, encoder_version=stable)
        new = client.embed(golden, encoder_version=new_version)
        cosines = np.sum(old * new, axis=1)
        samples: dict[int, list[float]] = {stable: [], new_version: []}
        for i in range(rollout.latency_samples):  # interleaved, so both see the same background load
            text = golden[i % len(golden)]
            for version in (stable, new_version) if i % 2 else (new_version, stable):
                started = time.perf_counter()
                client.embed([text], encoder_version=version)
                samples[version].append(time.perf_counter() - started)
        client.close()
    finally:
        triton.stop()
    report = {"parity_mean_cosine": round(float(cosines.mean()), 6), "parity_min_cosine": round(float(cosines.min()), 6),
              "golden_texts": len(golden), "p50_ms_stable": round(1000 * float(np.median(samples[stable])), 3),
              "p50_ms_new": round(1000 * float(np.median(samples[new_version])), 3)}
    log(f"[rollout] validation: parity mean cos {report['parity_mean_cosine']:.4f} (min {report['parity_min_cosine']:.4f}), "
        f"p50 {report['p50_ms_new']:.2f} ms vs stable {report['p50_ms_stable']:.2f} ms")
    if report["parity_mean_cosine"] < rollout.parity_min_mean_cosine or report["parity_min_cosine"] < rollout.parity_min_cosine:
        raise RolloutRefused(f"parity with version {stable}: mean cosine {report['parity_mean_cosine']:.4f} "
                             f"(need {rollout.parity_min_mean_cosine}), min {report['parity_min_cosine']:.4f} "
                             f"(need {rollout.parity_min_cosine})")
    if report["p50_ms_new"] > rollout.latency_max_ratio * report["p50_ms_stable"]:
        raise RolloutRefused(f"latency: p50 {report['p50_ms_new']:.2f} ms > {rollout.latency_max_ratio} x "
                             f"{report['p50_ms_stable']:.2f} ms of version {stable}")
    return report


def swap_in(live: LiveRepository, staging: Path, new_version: int, admin: TritonAdmin, log: Log = print) -> None:
    """The validated version goes live beside the stable one, and its pinned ensembles with it."""
    m = live.settings.models
    _put_dir(Path(staging) / m.encoder / str(new_version), live.version_dir(new_version))
    _put_config(Path(staging) / m.encoder, live.path / m.encoder)
    admin.load(m.encoder)  # loads N+1 beside N; N keeps serving while N+1 loads
    for name in (pinned_name(m.embed, new_version), pinned_name(m.score, new_version)):
        _put_dir(Path(staging) / name, live.path / name)
        admin.load(name)
    log(f"[rollout] version {new_version} is live as a canary ({pinned_name(m.embed, new_version)}, "
        f"{pinned_name(m.score, new_version)})")


def watch_canary(live: LiveRepository, admin: TritonAdmin, rollout: RolloutSettings, log: Log = print) -> dict:
    """Compares the canary's error rate and latency with the stable version's, from Triton's metrics."""
    m = live.settings.models
    stable, canary = live.stable, live.canary
    if canary is None:
        raise RolloutRefused("no canary is serving")
    before = admin.metrics()
    deadline = time.monotonic() + rollout.canary_seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 10.0))
        seen = traffic(before, admin.metrics(), [pinned_name(m.embed, canary), pinned_name(m.score, canary)])
        log(f"[rollout] canary: {seen['requests']} requests, {seen['failures']} failed, "
            f"{max(left - 10, 0):.0f} s left")
    after = admin.metrics()
    stable_models = [m.embed, m.score]
    report = {"stable": traffic(before, after, stable_models),
              "canary": traffic(before, after, [pinned_name(m.embed, canary), pinned_name(m.score, canary)])}
    s, c = report["stable"], report["canary"]
    reasons = []
    if c["requests"] < rollout.canary_min_requests:
        reasons.append(f"only {c['requests']} canary requests (need {rollout.canary_min_requests}): "
                       "are clients sending a canary share?")
    if c["failure_rate"] > s["failure_rate"] + rollout.canary_max_failure_rate:
        reasons.append(f"failure rate {c['failure_rate']:.4f} vs stable {s['failure_rate']:.4f}")
    if s["requests"] and c["mean_ms"] > max(rollout.canary_max_latency_ratio * s["mean_ms"],
                                            s["mean_ms"] + rollout.canary_latency_slack_ms):
        reasons.append(f"mean latency {c['mean_ms']:.2f} ms vs stable {s['mean_ms']:.2f} ms")
    report["healthy"] = not reasons
    report["reasons"] = reasons
    log(f"[rollout] canary v{canary}: {c['requests']} req, failure rate {c['failure_rate']:.4f}, mean {c['mean_ms']:.2f} ms | "
        f"stable v{stable}: {s['requests']} req, failure rate {s['failure_rate']:.4f}, mean {s['mean_ms']:.2f} ms"
        + (f" -> unhealthy: {'; '.join(reasons)}" if reasons else " -> healthy"))
    return report


def reembed_index(live: LiveRepository, client, store, version: int, log: Log = print) -> str:
    """The catalog index, embedded again by `version` through its pinned ensemble; published, not switched."""
    from client.index import embed_index

    current = store.load()
    if current.texts is None:
        raise RolloutRefused(f"index {store.current_name()} has no texts to re-embed: rebuild it with this version")
    started = time.perf_counter()
    index = embed_index(client, current.item_ids, current.texts, current.settings, encoder_version=version)
    name = store.publish(index)
    log(f"[rollout] catalog index re-embedded by version {version}: {len(index)} items in "
        f"{time.perf_counter() - started:.1f} s -> {store.root / name}")
    return name


def promote(live: LiveRepository, admin: TritonAdmin, rollout: RolloutSettings, store=None, index_name: str | None = None,
            log: Log = print) -> int:
    """The canary becomes stable: ensembles repointed (both versions loaded), index switched, drain, then
    the old version's ensembles unloaded and the encoder narrowed to the new version, which also records it
    as stable in the encoder's parameters (one encoder reload, not two)."""
    m = live.settings.models
    old, new = live.stable, live.canary
    if new is None:
        retiring = [v for v in live.versions if v < live.stable]
        if not retiring:
            raise RolloutRefused("no canary to promote")
        # A promotion that stopped after repointing the ensembles: finish retiring the old version(s).
        for version in retiring:
            _retire(live, admin, version, keep=live.stable, runtime=rollout.runtime)
        log(f"[rollout] finished promoting: version {live.stable} serves alone")
        return live.stable
    generation = _regenerate(live, sorted({old, new}), new, rollout.runtime)
    try:
        for name in (m.embed, m.score):  # ensembles reload in milliseconds; the encoder is not touched
            _put_config(generation / name, live.path / name)
            admin.load(name)
        if store is not None and index_name is not None:
            store.switch(index_name)
            log(f"[rollout] catalog index switched to {index_name}")
        log(f"[rollout] `{m.embed}`/`{m.score}` now serve version {new}; draining version {old} for {rollout.drain_seconds:.0f} s")
        time.sleep(rollout.drain_seconds)
        _retire(live, admin, old, keep=new, runtime=rollout.runtime)
    finally:
        shutil.rmtree(generation.parent, ignore_errors=True)
    if store is not None and index_name is not None:
        store.remove_others({index_name})
    log(f"[rollout] promoted: version {new} serves alone")
    return new


def roll_back(live: LiveRepository, admin: TritonAdmin, rollout: RolloutSettings, store=None, log: Log = print) -> int:
    """The canary goes; the stable version never stopped serving."""
    stable, canary = live.stable, live.canary
    if canary is None:
        raise RolloutRefused("no canary to roll back")
    _retire(live, admin, canary, keep=stable, runtime=rollout.runtime)
    if store is not None and store.current_name():
        store.remove_others({store.current_name()})
    log(f"[rollout] rolled back: version {stable} serves alone")
    return stable


def _retire(live: LiveRepository, admin: TritonAdmin, version: int, keep: int, runtime: str) -> None:
    """Unload `version`'s pinned ensembles, then narrow the encoder to `keep` (never unload the encoder)."""
    m = live.settings.models
    for name in (pinned_name(m.embed, version), pinned_name(m.score, version)):
        if (live.path / name).exists():
            admin.unload(name)
            shutil.rmtree(live.path / name)
    generation = _regenerate(live, [keep], keep, runtime)
    try:
        _put_config(generation / m.encoder, live.path / m.encoder)
        admin.load(m.encoder)
    finally:
        shutil.rmtree(generation.parent, ignore_errors=True)
    shutil.rmtree(live.version_dir(version), ignore_errors=True)


# ---- the whole rollout, and what is serving ------------------------------------------------------------
def run(live: LiveRepository, admin: TritonAdmin, new_export: Path, rollout: RolloutSettings = RolloutSettings(),
        golden: list[str] | None = None, store=None, client=None, log: Log = print) -> dict:
    """stage -> validate -> swap in -> canary (-> re-embed the catalog index) -> promote, or roll back.
    Raises RolloutRefused if the new version never went live; otherwise returns a report whose `outcome` is
    `promoted` or `rolled_back`."""
    from export.gate import load_gate_sentences

    golden = golden or load_gate_sentences()[0]
    report: dict = {"export": str(new_export), "settings": asdict(rollout), "started_at": time.time()}
    with live.lock():
        with tempfile.TemporaryDirectory(prefix=".rollout-", dir=live.path.parent) as workdir:
            staging, new_version = stage(live, new_export, Path(workdir), rollout)
            report.update(stable=live.stable, new_version=new_version)
            log(f"[rollout] staged {new_export} as version {new_version} (stable: {live.stable})")
            report["validation"] = validate(staging, live.settings, live.stable, new_version, golden, rollout, log)
            try:
                swap_in(live, staging, new_version, admin, log)
                report["canary"] = canary = watch_canary(live, admin, rollout, log)
                index_name = None
                if canary["healthy"] and store is not None:
                    index_name = reembed_index(live, client, store, new_version, log)
                    report["index"] = index_name
            except Exception as error:  # anything unexpected before promotion: back to the stable version alone
                log(f"[rollout] {type(error).__name__}: {error}; rolling back")
                if live.canary is not None:
                    roll_back(live, admin, rollout, store, log)
                else:
                    shutil.rmtree(live.version_dir(new_version), ignore_errors=True)
                raise
        if canary["healthy"]:
            promote(live, admin, rollout, store, index_name, log)
            report["outcome"] = "promoted"
        else:
            roll_back(live, admin, rollout, store, log)
            report["outcome"] = "rolled_back"
    report["seconds"] = round(time.time() - report["started_at"], 1)
    _append_history(live, report)
    return report


def _append_history(live: LiveRepository, report: dict) -> None:
    with open(live.path.parent / f"{live.path.name}.rollouts.jsonl", "a") as handle:
        handle.write(json.dumps(report) + "\n")


def status(live: LiveRepository, admin: TritonAdmin | None = None, window_s: float = 5.0, store=None) -> dict:
    """What is serving: versions with their manifests, which ensemble serves which version, whether Triton
    has each ready, and (with `admin`) each version's share of the requests over the last `window_s`."""
    m = live.settings.models
    stable, canary = live.stable, live.canary
    versions = {}
    for version in live.versions:
        manifest = live.manifest(version)
        role = "stable" if version == stable else "canary" if version == canary else "retiring"
        versions[version] = {
            "role": role, "variant": manifest["variant"], "exported_at": manifest["exported_at"],
            "artifact_sha256": manifest["artifact"]["sha256"][:16],
            "gate": {k: manifest["gate"]["figures"].get(k) for k in ("cosine_mean", "spearman_ratio")},
            "served_by": [m.embed, m.score] * (version == stable) + [pinned_name(m.embed, version), pinned_name(m.score, version)],
        }
    result = {"repository": str(live.path), "stable": stable, "canary": canary, "versions": versions}
    if store is not None:
        result["catalog_index"] = {"current": store.current_name(), "available": store.names()}
    if admin is not None:
        before = admin.metrics()
        time.sleep(window_s)
        after = admin.metrics()
        counts = {}
        for version, info in versions.items():
            info["ready"] = {name: admin.ready(name) for name in info["served_by"]}
            pinned = [pinned_name(m.embed, version), pinned_name(m.score, version)]
            counts[version] = traffic(before, after, pinned + ([m.embed, m.score] if version == stable else []))["requests"]
        total = sum(counts.values())
        for version, count in counts.items():
            versions[version]["requests_last_window"] = count
            versions[version]["traffic_share"] = round(count / total, 4) if total else 0.0
        result["window_s"] = window_s
    return result
