"""Kubernetes pieces that kubernetes-validate cannot see: the prometheus-adapter chart's values, the PodMonitors
(CRDs), and rollout.sh re-listing ready pods while a rollout runs (with fake kubectl and python on PATH)."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import yaml

from bert_recsys import settings
from bert_recsys.rollout.admin import Replica, TritonAdmin, replicas_from_file

K8S = settings.REPO_ROOT / "docker" / "k8s"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_adapter_values_are_in_the_shape_the_chart_reads_and_feed_the_hpa():
    values = yaml.safe_load((K8S / "helm" / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert values["rules"]["default"] is False and rules
    for rule in rules:
        assert {"seriesQuery", "resources", "name", "metricsQuery"} <= set(rule)
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    exposed = {rule["name"]["as"] for rule in rules}
    hpa = docs(K8S / "hpa.yaml")[0]
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"} <= exposed


def test_pod_monitors_select_real_pods_by_named_ports():
    deployments = {d["metadata"]["name"]: d for p in K8S.glob("*deployment.yaml") for d in docs(p)
                   if d["kind"] == "Deployment"}
    monitors = docs(K8S / "monitoring" / "podmonitor.yaml")
    assert {m["metadata"]["name"] for m in monitors} == {"triton", "gateway"}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matched = [d for d in deployments.values()
                   if wanted.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_the_admin_secret_the_deployment_reads_is_created_in_the_deployment_steps():
    deployment = docs(K8S / "deployment.yaml")[0]
    env = {e["name"]: e for c in deployment["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    ref = env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    steps = (settings.REPO_ROOT / "docs" / "production.md").read_text()  # the README's Documentation links it
    assert re.search(rf"kubectl create secret generic {ref['name']} --from-literal={ref['key']}=", steps)


def test_discovered_replicas_are_administered_from_the_next_step_on(tmp_path):
    listing = tmp_path / "replicas"
    listing.write_text("10.0.0.1:8001,10.0.0.1:8002\n")
    admin = TritonAdmin([], "key", discover=replicas_from_file(listing))
    assert admin.replicas == [Replica("10.0.0.1:8001", "10.0.0.1:8002")]
    listing.write_text("10.0.0.1:8001,10.0.0.1:8002\n10.0.0.2:8001,10.0.0.2:8002\n")
    assert [r.grpc_url for r in admin.refresh()] == ["10.0.0.1:8001", "10.0.0.2:8001"]
    listing.write_text("")  # a listing that failed: keep administering the last known replicas
    assert len(admin.refresh()) == 2
    admin.close()


FAKE_KUBECTL = """#!/usr/bin/env bash
# Two ready pods at first; a third (scaled out by the HPA) once $STATE/scaled exists; one not ready.
echo called >> "$STATE/kubectl-calls"
echo "10.0.0.1 True"
echo "10.0.0.2 True"
echo "10.0.0.9 False"
if [[ -e "$STATE/scaled" ]]; then echo "10.0.0.3 True"; fi
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for `bert-recsys rollout`: reads the replicas file it was given, the HPA scales out, reads it again.
file=""
while [[ $# -gt 0 ]]; do [[ "$1" == --replicas-file ]] && file="$2"; shift; done
cat "$file" > "$STATE/first"
touch "$STATE/scaled"
sleep 1.5
cat "$file" > "$STATE/second"
"""


def test_rollout_sh_lists_ready_pods_again_while_the_rollout_runs(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir(), state.mkdir()
    for name, text in (("kubectl", FAKE_KUBECTL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STATE": str(state), "TRITON_ADMIN_KEY": "k", "NEW": "/x",
           "REFRESH_SECONDS": "0.2", "TMPDIR": str(tmp_path)}
    started = time.monotonic()
    result = subprocess.run(["bash", str(K8S / "rollout.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (state / "first").read_text().split() == ["10.0.0.1:8001,10.0.0.1:8002", "10.0.0.2:8001,10.0.0.2:8002"]
    assert "10.0.0.3:8001,10.0.0.3:8002" in (state / "second").read_text().split()
    assert "10.0.0.9" not in (state / "second").read_text()  # not ready: not administered
    assert time.monotonic() - started < 30
    assert [p for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []  # its temp files are removed
    calls = (state / "kubectl-calls").read_text().count("called")
    time.sleep(1.0)
    assert (state / "kubectl-calls").read_text().count("called") == calls  # the refresher ended with the script
