"""What is serving: versions with their manifests and roles, which ensemble serves which version, readiness,
and each version's share of the requests over a short window of Triton's metrics."""
from __future__ import annotations

import time

from bert_recsys.client.index import IndexStore
from bert_recsys.rollout.admin import TritonAdmin
from bert_recsys.rollout.policy import role, shares, traffic
from bert_recsys.rollout.repository import LiveRepository


def status(live: LiveRepository, admin: TritonAdmin | None = None, window_s: float = 5.0,
           store: IndexStore | None = None) -> dict:
    """Without `admin`, only what the repository says; with it, readiness and traffic shares too."""
    m = live.settings.models
    stable, canary = live.stable, live.canary
    versions = {}
    for version in live.versions:
        manifest = live.manifest(version)
        versions[version] = {
            "role": role(version, stable, canary), "variant": manifest.variant, "exported_at": manifest.exported_at,
            "artifact_sha256": manifest.artifact.sha256[:16],
            "gate": {"cosine_mean": manifest.gate.figures.cosine_mean, "spearman_ratio": manifest.gate.figures.spearman_ratio},
            "served_by": list(m.serving(version, stable)),
        }
    result = {"repository": str(live.path), "runtime": str(live.runtime), "stable": stable, "canary": canary,
              "versions": versions}
    if store is not None:
        result["catalog_index"] = {"current": store.current_name(), "available": store.names()}
    if admin is not None:
        before = admin.metrics()
        time.sleep(window_s)
        after = admin.metrics()
        counts = {}
        for version, info in versions.items():
            info["ready"] = {name: admin.ready(name) for name in info["served_by"]}
            counts[version] = traffic(before, after, info["served_by"]).requests
        for version, share in shares(counts).items():
            versions[version]["requests_last_window"] = counts[version]
            versions[version]["traffic_share"] = share
        result["window_s"] = window_s
    return result
