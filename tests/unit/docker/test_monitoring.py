"""The shipped monitoring files: Prometheus's config and rules for compose, their Kubernetes twins, the Grafana
dashboards and the runbook. promtool checks the files; tests/integration/test_prometheus.py runs them against a real
Prometheus scraping a real tritonserver and gateway."""
from __future__ import annotations

import json
import re
import subprocess

import yaml

from bert_recsys import settings
from monitoring_queries import (DASHBOARDS, DOCKER, PROMETHEUS_CONFIG, PROMETHEUS_RULE, RULES, dashboard_queries,
                                needs_gpu, panels, rules, tool_or_skip)

PRODUCTION_DOC = settings.REPO_ROOT / "docs" / "production.md"


def promtool() -> str:
    return tool_or_skip("promtool")


def test_promtool_passes_the_compose_config_and_both_rule_files(tmp_path):
    tool = promtool()
    # `check config` also checks the rule files the config names (relative to the config's folder).
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(RULES)]):
        result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    k8s = tmp_path / "prometheusrule-groups.yml"
    k8s.write_text(yaml.safe_dump({"groups": yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]}))
    result = subprocess.run([tool, "check", "rules", str(k8s)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_would_catch_a_broken_expression(tmp_path):
    """The check above can fail: a rule file with a typo is refused."""
    tool = promtool()
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - record: a:b\n        expr: sum by (route (rate(x[1m]))\n")
    assert subprocess.run([tool, "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0


def test_the_kubernetes_rules_are_the_compose_rules():
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # what the stack's Prometheus selects
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], \
        "docker/k8s/monitoring/prometheusrule.yaml differs from docker/prometheus-rules.yml: copy the groups over"


def test_compose_scrapes_triton_and_the_gateway_under_the_job_names_kubernetes_gives_them():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"triton", "gateway"}
    for name, job in jobs.items():
        (target,) = [t for c in job["static_configs"] for t in c["targets"]]
        service, port = target.split(":")
        assert service == name and service in compose
        published = {p.rsplit(":", 1)[-1] for p in compose[service].get("ports", [])}
        assert port in published, f"{target}: the service does not listen there"
        assert job.get("metrics_path", "/metrics") == "/metrics"
    mounted = " ".join(compose["prometheus"]["volumes"])
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).exists() and f"/etc/prometheus/{rule_file}:ro" in mounted
    # Kubernetes: each PodMonitor names its targets' job after the pod's `app` label, the same names.
    monitors = [d for d in yaml.safe_load_all((DOCKER / "k8s" / "monitoring" / "podmonitor.yaml").read_text()) if d]
    for monitor in monitors:
        assert monitor["spec"]["jobLabel"] == "app"
        assert monitor["spec"]["selector"]["matchLabels"]["app"] in jobs


def test_every_alert_has_a_window_a_severity_and_a_runbook_line_and_watches_a_graphable_series():
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    alerts = [rule for rule in rules() if "alert" in rule]
    doc = PRODUCTION_DOC.read_text()
    headings = {re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-")) for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert["for"]), name
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        page, _, anchor = alert["annotations"]["runbook"].partition("#")
        assert page == "docs/production.md" and anchor == name.lower() and anchor in headings, name
        assert alert["annotations"]["summary"], name
        used = set(re.findall(r"[a-z_]+:[a-z0-9_:]+", alert["expr"]))
        assert used <= recorded, f"{name} reads unrecorded series {used - recorded}"
        assert used or re.search(r"\bup\{", alert["expr"]), f"{name}: alert on a recorded series or on `up`"
    # The PodMonitors' selectors and ports against the Deployments: tests/unit/docker/test_k8s.py.
    assert {a["alert"] for a in alerts} >= {"TritonNotReady", "GatewayErrorRate", "GatewayLatencyOverSLO",
                                            "TritonQueueGrowing", "RateLimitSurge", "AuthFailureSurge", "CanaryFailing",
                                            "TritonCrashLooping"}


def test_the_gateway_dashboard_shows_what_operators_ask_for():
    exprs = {expr for name, _, expr in dashboard_queries() if name == "gateway.json"}
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    text = " ".join(exprs) + " " + " ".join(recorded[r] for r in recorded if any(r in e for e in exprs))
    assert "sum by (namespace, route, status) (rate(gateway_responses_total" in text   # per route and status
    assert re.search(r"histogram_quantile\(0\.99,\s+sum by \(namespace, le, route\)", text)
    assert "histogram_quantile(0.5" in text
    assert 'sum by (namespace, key, status) (rate(gateway_responses_total{job="gateway", status=~"401|429"}' in text
    assert "gateway_in_flight" in text and 'status="503"' in text
    assert "triton:version_share:rate1m" in exprs                                    # the canary's share


def test_gpu_panels_say_they_need_a_gpu_and_nothing_else_does():
    for path in DASHBOARDS.glob("*.json"):
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            gpu = [needs_gpu(t["expr"]) for t in panel.get("targets", ())]
            if any(gpu):
                assert all(gpu) and "needs a GPU" in panel["title"] and "CPU" in panel["description"], panel["title"]
            elif panel["type"] != "row":
                assert "GPU" not in panel["title"], panel["title"]
        gpu_rows = [p for p in dashboard["panels"] if p["type"] == "row" and "GPU" in p["title"]]
        assert all(row["collapsed"] and "needs a GPU" in row["title"] for row in gpu_rows)
