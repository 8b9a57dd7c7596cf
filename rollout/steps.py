"""Version rollout on a live tritonserver: stage -> validate -> swap in -> index -> canary -> promote or roll back.

The live repository is served in explicit model-control mode. A new export becomes encoder version N+1 beside
the stable version N:

    encoder/N/, encoder/N+1/      version policy `specific [N, N+1]`
    embed, score                  pinned to N (the stable version, what plain clients get)
    embed_vN, score_vN            pinned to N
    embed_vN+1, score_vN+1        pinned to N+1 (the canary: clients send it `canary_share` of their calls)

This module orchestrates; it measures and acts, and leaves every decision to rollout/policy.py (pure), every
file change to rollout/repository.py (atomic) and every server call to rollout/admin.py. No step leaves an
ensemble pointing at a version that is not loaded, so no request fails:
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

import json
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys.client.experiments.events import EventStore
from bert_recsys.client.experiments.report import METRIC_COLUMN, per_user
from bert_recsys.client.index import IndexStore, embed_index
from bert_recsys.client.triton import CANARY_FALLBACK, RetryPolicy, TritonClient
from bert_recsys.contracts.manifest import Manifest, ManifestError
from bert_recsys.contracts.runtime import Runtime
from bert_recsys.export.gate import load_gate_sentences
from bert_recsys.rollout.admin import Replica, TritonAdmin
from bert_recsys.rollout.policy import (Outcome, Phase, Responses, RolloutRefused, RolloutSettings, Validation,
                                        canary_verdict, index_failure, traffic, validation_failures)
from bert_recsys.rollout.repository import LiveRepository, put_config, put_dir
from bert_recsys.rollout.status import status
from bert_recsys.server.launcher import ServerError, TritonServer, on_free_ports
from bert_recsys.settings import Settings

log = logs.get("rollout")
# The rollout's public names, importable from here as before the split.
__all__ = ["LiveRepository", "Replica", "TritonAdmin", "RolloutRefused", "RolloutSettings", "traffic", "status",
           "stage", "validate", "swap_in", "canary_index", "watch_canary", "reembed_index", "promote", "roll_back",
           "run"]


def runtime_of(live: LiveRepository, rollout: RolloutSettings) -> Runtime:
    """The runtime asked for, else the one the live encoder already runs."""
    return Runtime.parse(rollout.runtime) if rollout.runtime else live.runtime


# ---- the steps ----------------------------------------------------------------------------------------
def stage(live: LiveRepository, new_export: Path, workdir: Path, rollout: RolloutSettings) -> tuple[Path, int]:
    """A staging repository: the stable version plus the new export as version N+1. Nothing live changes."""
    new_export = Path(new_export)
    try:
        manifest = Manifest.read(new_export)
        stable = live.stable
        stable_manifest = live.manifest(stable)
    except ManifestError as error:
        raise RolloutRefused(str(error)) from None  # ManifestError names the file
    problems = manifest.artifact_problems(new_export)
    if problems:
        raise RolloutRefused(f"{new_export}: {'; '.join(problems)}")
    if not manifest.gate.passed:
        raise RolloutRefused(f"{new_export} did not pass the export gate: {list(manifest.gate.failures)}")
    if live.canary is not None:
        raise RolloutRefused(f"version {live.canary} is already a canary: promote or roll it back first")
    if manifest.tokenizer_sha256 != stable_manifest.tokenizer_sha256:
        raise RolloutRefused("the new export uses another tokenizer: serve it from a new repository")
    new_version = max(live.versions) + 1
    try:
        staging = live.render({stable: live.version_dir(stable), new_version: new_export}, stable,
                              runtime_of(live, rollout), Path(workdir) / "staging")
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


def measure(client: TritonClient, stable: int, new_version: int, golden: list[str], samples: int) -> Validation:
    """Parity of the two versions on the golden set, and their batch-1 p50, sampled interleaved so both see the
    same background load."""
    old = client.embed(golden, encoder_version=stable)
    new = client.embed(golden, encoder_version=new_version)
    cosines = np.sum(old * new, axis=1)
    seconds: dict[int, list[float]] = {stable: [], new_version: []}
    for i in range(samples):
        text = golden[i % len(golden)]
        for version in (stable, new_version) if i % 2 else (new_version, stable):
            started = time.perf_counter()
            client.embed([text], encoder_version=version)
            seconds[version].append(time.perf_counter() - started)
    return Validation(parity_mean_cosine=round(float(cosines.mean()), 6), parity_min_cosine=round(float(cosines.min()), 6),
                      golden_texts=len(golden), p50_ms_stable=round(1000 * float(np.median(seconds[stable])), 3),
                      p50_ms_new=round(1000 * float(np.median(seconds[new_version])), 3))


def validate(staging: Path, settings: Settings, stable: int, new_version: int, golden: list[str],
             rollout: RolloutSettings) -> dict:
    """Serves the staging repository on a separate server (its own ports); raises RolloutRefused unless the
    new version loads, matches the stable one on the golden set and keeps its latency."""
    server = on_free_ports(settings.server, admin_key="")
    log_file = Path(staging).with_name("validation-server.log")
    log.info("validation server on %s: loading versions %d and %d", server.grpc_url, stable, new_version)
    try:
        triton = TritonServer(staging, server, log_file=log_file, startup_timeout_s=600).start()
    except ServerError as error:
        raise RolloutRefused(f"version {new_version} does not load: {error}: {_log_tail(log_file)}") from None
    try:
        with TritonClient(server.grpc_url, settings=replace(settings, server=server), retry=RetryPolicy(attempts=3),
                          timeout_s=300) as client:
            figures = measure(client, stable, new_version, golden, rollout.latency_samples)
    finally:
        triton.stop()
    log.info("validation: parity mean cos %.4f (min %.4f), p50 %.2f ms vs stable %.2f ms", figures.parity_mean_cosine,
             figures.parity_min_cosine, figures.p50_ms_new, figures.p50_ms_stable)
    failures = validation_failures(figures, stable, rollout)
    if failures:
        raise RolloutRefused("; ".join(failures))
    return figures.to_json()


def swap_in(live: LiveRepository, staging: Path, new_version: int, admin: TritonAdmin) -> None:
    """The validated version goes live beside the stable one, and its pinned ensembles with it."""
    m = live.settings.models
    put_dir(Path(staging) / m.encoder / str(new_version), live.version_dir(new_version))
    put_config(Path(staging) / m.encoder, live.path / m.encoder)
    admin.load(m.encoder)  # loads N+1 beside N; N keeps serving while N+1 loads
    for name in m.pinned_ensembles(new_version):
        put_dir(Path(staging) / name, live.path / name)
        admin.load(name)
    log.info("version %d is live as a canary (%s)", new_version, ", ".join(m.pinned_ensembles(new_version)))


def responses(events: EventStore, since: float, stable: int, canary: int, metric: str) -> tuple[Responses, Responses]:
    """Per version, what users did with the lists it produced since `since` (impression time)."""
    slots = events.slots(since=since)
    column = METRIC_COLUMN[metric]
    return tuple(Responses(v, per_user(slots.take(slots.encoder_version == v), column)) for v in (stable, canary))


def watch_canary(live: LiveRepository, admin: TritonAdmin, rollout: RolloutSettings,
                 events: EventStore | None = None) -> dict:
    """Compares the canary's error rate and latency with the stable version's, from Triton's metrics, and, when
    the rollout checks conversion, what users did with each version's lists, from the event store."""
    m = live.settings.models
    stable, canary = live.stable, live.canary
    if canary is None:
        raise RolloutRefused("no canary is serving")
    canary_models = m.pinned_ensembles(canary)
    since = time.time()
    before = admin.metrics()
    deadline = time.monotonic() + rollout.canary_seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 10.0))
        seen = traffic(before, admin.metrics(), canary_models)
        log.info("canary: %d requests, %d failed, %.0f s left", seen.requests, seen.failures, max(left - 10, 0))
    after = admin.metrics()
    seen_responses = (responses(events, since, stable, canary, rollout.canary_conversion_metric)
                      if rollout.checks_conversion else None)
    # Both sides hold the same mix: recommendations pin every call to their index's version (`score_vN`), so the
    # stable side is the public ensembles and the stable version's pinned ones.
    verdict = canary_verdict(traffic(before, after, m.serving(stable, stable)), traffic(before, after, canary_models), rollout,
                             seen_responses)
    s, c = verdict.stable, verdict.canary
    log.info("canary v%d: %d req, failure rate %.4f, mean %.2f ms | stable v%d: %d req, failure rate %.4f, mean %.2f ms"
             " -> %s", canary, c.requests, c.failure_rate, c.mean_ms, stable, s.requests, s.failure_rate, s.mean_ms,
             "healthy" if verdict.healthy else "unhealthy: " + "; ".join(verdict.reasons))
    return verdict.to_json()


def canary_index(live: LiveRepository, admin: TritonAdmin, client: TritonClient, store: IndexStore,
                 version: int) -> tuple[str | None, dict | None]:
    """The catalog index embedded by the canary `version`, published (not switched) before its canary window, so
    that clients can serve its share of recommendations from it (client.canary). -> (its name, None), or (None, an
    unhealthy verdict) when the canary fails the embedding: it is then rolled back before any share reaches it."""
    m = live.settings.models
    before = admin.metrics()
    try:
        return reembed_index(live, client, store, version), None
    except CANARY_FALLBACK as error:
        after = admin.metrics()
        verdict = index_failure(traffic(before, after, m.serving(live.stable, live.stable)), traffic(before, after, m.pinned_ensembles(version)),
                                str(error))
        log.warning("canary v%d: %s", version, verdict.reasons[0])
        return None, verdict.to_json()


def reembed_index(live: LiveRepository, client: TritonClient, store: IndexStore, version: int) -> str:
    """The catalog index, embedded again by `version` through its pinned ensemble; published, not switched."""
    current = store.load()
    if current.texts is None:
        raise RolloutRefused(f"index {store.current_name()} has no texts to re-embed: rebuild it with this version")
    started = time.perf_counter()
    index = embed_index(client, current.item_ids, current.texts, current.settings, encoder_version=version,
                        template=current.template)
    name = store.publish(index)
    log.info("catalog index re-embedded by version %d: %d items in %.1f s -> %s", version, len(index),
             time.perf_counter() - started, store.root / name)
    return name


def promote(live: LiveRepository, admin: TritonAdmin, rollout: RolloutSettings, store: IndexStore | None = None,
            index_name: str | None = None) -> int:
    """The canary becomes stable: ensembles repointed (both versions loaded), index switched, drain, then
    the old version's ensembles unloaded and the encoder narrowed to the new version, which also records it
    as stable in the encoder's parameters (one encoder reload, not two)."""
    m = live.settings.models
    old, new = live.stable, live.canary
    runtime = runtime_of(live, rollout)
    if new is None:
        retiring = [v for v in live.versions if v < live.stable]
        if not retiring:
            raise RolloutRefused("no canary to promote")
        # A promotion that stopped after repointing the ensembles: finish retiring the old version(s).
        for version in retiring:
            _retire(live, admin, version, keep=live.stable, runtime=runtime)
        log.info("finished promoting: version %d serves alone", live.stable)
        return live.stable
    if store is not None and index_name is None:  # by hand (`rollout promote`): the index the canary embedded
        index_name = store.find(new)
        if index_name is None:
            log.warning("no catalog index of version %d in %s: recommendations keep version %d's index, whose calls "
                        "fail once it is retired; re-embed the catalog with version %d", new, store.root, old, new)
    with live.generation(sorted({old, new}), new, runtime) as generation:
        for name in m.ensembles:  # ensembles reload in milliseconds; the encoder is not touched
            put_config(generation / name, live.path / name)
            admin.load(name)
        if store is not None and index_name is not None:
            store.switch(index_name)
            log.info("catalog index switched to %s", index_name)
        log.info("`%s`/`%s` now serve version %d; draining version %d for %.0f s", m.embed, m.score, new, old,
                 rollout.drain_seconds)
        time.sleep(rollout.drain_seconds)
    _retire(live, admin, old, keep=new, runtime=runtime)
    if store is not None and index_name is not None:
        store.remove_others({index_name})
    log.info("promoted: version %d serves alone", new)
    return new


def roll_back(live: LiveRepository, admin: TritonAdmin, rollout: RolloutSettings, store: IndexStore | None = None) -> int:
    """The canary goes; the stable version never stopped serving."""
    stable, canary = live.stable, live.canary
    if canary is None:
        raise RolloutRefused("no canary to roll back")
    _retire(live, admin, canary, keep=stable, runtime=runtime_of(live, rollout))
    if store is not None and store.current_name():
        store.remove_others({store.current_name()})
    log.info("rolled back: version %d serves alone", stable)
    return stable


def _retire(live: LiveRepository, admin: TritonAdmin, version: int, keep: int, runtime: Runtime) -> None:
    """Unload `version`'s pinned ensembles, then narrow the encoder to `keep` (never unload the encoder)."""
    m = live.settings.models
    for name in m.pinned_ensembles(version):
        if (live.path / name).exists():
            admin.unload(name)
            shutil.rmtree(live.path / name)
    with live.generation([keep], keep, runtime) as generation:
        put_config(generation / m.encoder, live.path / m.encoder)
        admin.load(m.encoder)
    shutil.rmtree(live.version_dir(version), ignore_errors=True)


# ---- the whole rollout ------------------------------------------------------------------------------------
def run(live: LiveRepository, admin: TritonAdmin, new_export: Path, rollout: RolloutSettings = RolloutSettings(),
        golden: list[str] | None = None, store: IndexStore | None = None, client: TritonClient | None = None,
        events: EventStore | None = None) -> dict:
    """stage -> validate -> swap in (-> the canary embeds the catalog index) -> canary -> promote, or roll back.
    Raises RolloutRefused if the new version never went live; otherwise returns a report whose `outcome` is an
    Outcome and whose `phases` are (Phase, start time) in order. `events`: the experiment event store the conversion check reads."""
    if rollout.checks_conversion and events is None:
        raise RolloutRefused("canary_max_conversion_drop is set but no event store was given (--events)")
    if store is not None and client is None:
        raise RolloutRefused("an index store to re-embed needs a client of the live server")
    golden = golden or load_gate_sentences()[0]
    report: dict = {"export": str(new_export), "settings": asdict(rollout), "started_at": time.time()}
    with live.lock():
        with tempfile.TemporaryDirectory(prefix=".rollout-", dir=live.path.parent) as workdir:
            staging, new_version = stage(live, new_export, Path(workdir), rollout)
            report.update(stable=live.stable, new_version=new_version, phases=[(Phase.VALIDATE, time.time())])
            log.info("staged %s as version %d (stable: %d)", new_export, new_version, live.stable)
            report["validation"] = validate(staging, live.settings, live.stable, new_version, golden, rollout)
            try:
                swap_in(live, staging, new_version, admin)
                index_name = canary = None
                if store is not None:  # before the window: the canary's share of recommendations is served from it
                    report["phases"].append((Phase.INDEX, time.time()))
                    index_name, canary = canary_index(live, admin, client, store, new_version)
                    report["index"] = index_name
                if canary is None:
                    report["phases"].append((Phase.CANARY, time.time()))
                    canary = watch_canary(live, admin, rollout, events)
                report["canary"] = canary
            except Exception as error:  # anything unexpected before promotion: back to the stable version alone
                log.warning("%s: %s; rolling back", type(error).__name__, error)
                if live.canary is not None:
                    roll_back(live, admin, rollout, store)
                else:
                    shutil.rmtree(live.version_dir(new_version), ignore_errors=True)
                raise
        report["outcome"] = outcome = Outcome.of(canary["healthy"])
        report["phases"].append((Phase.PROMOTE if outcome is Outcome.PROMOTED else Phase.ROLL_BACK, time.time()))
        if outcome is Outcome.PROMOTED:
            promote(live, admin, rollout, store, index_name)
        else:
            roll_back(live, admin, rollout, store)
    report["phases"].append((Phase.DONE, time.time()))
    report["seconds"] = round(time.time() - report["started_at"], 1)
    _append_history(live, report)
    return report


def _append_history(live: LiveRepository, report: dict) -> None:
    with open(live.path.parent / f"{live.path.name}.rollouts.jsonl", "a") as handle:
        handle.write(json.dumps(report) + "\n")
