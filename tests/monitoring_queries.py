"""Every PromQL expression the shipped monitoring files hold: the Grafana dashboards (rows included), the
recording and alert rules, the prometheus-adapter values. The unit tests check their shape, the integration tests
run them against a real Prometheus (tests/integration/test_prometheus.py) or a real tritonserver's metrics."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
DASHBOARDS = DOCKER / "grafana" / "dashboards"
RULES = DOCKER / "prometheus-rules.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"
PROMETHEUS_RULE = DOCKER / "k8s" / "monitoring" / "prometheusrule.yaml"

# Triton's GPU metrics exist only on a server that sees a GPU (DCGM inside tritonserver).
GPU_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes", "nv_gpu_power_usage",
               "nv_energy_consumption", "nv_gpu_power_limit"}


def tool_or_skip(name: str) -> str:
    """The path of Debian's `prometheus` or `promtool`; the test skips, saying why, where it is missing."""
    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: `make monitoring-tools` installs Debian's prometheus package (needs root "
                    "or sudo and apt); it could not here")
    return path


def panels(dashboard: dict):
    """Every panel, those inside (collapsed) rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every dashboard."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in panels(json.loads(path.read_text())):
            out += [(path.name, panel["title"], t["expr"]) for t in panel.get("targets", ())]
    return out


def rules(path: Path = RULES) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_queries() -> list[tuple[str, str]]:
    """(record or alert name, expr) for every rule."""
    return [(rule.get("record") or rule["alert"], rule["expr"]) for rule in rules()]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:nv|gateway)_[a-z_]+", expr))


def needs_gpu(expr: str) -> bool:
    return bool(metric_names(expr) & GPU_METRICS)
