"""docker/ is not run here (no Docker engine); it is linted with the real linters and cross-checked."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bert_recsys import settings
from bert_recsys.server.launcher import RESTRICTED_APIS

DOCKER = settings.REPO_ROOT / "docker"
BIN = Path(__import__("sys").executable).parent


def tool(name):
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is missing from the venv (requirements-dev.txt installs it)")
    return str(path)


def run(*command):
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=DOCKER)


def test_dockerfiles_pass_hadolint():
    result = run(tool("hadolint"), *sorted(str(p) for p in DOCKER.glob("Dockerfile.*")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_spec():
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_is_clean():
    config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}, braces: {max-spaces-inside: 1}}}"
    result = run(tool("yamllint"), "-d", config, ".")
    assert result.returncode == 0, result.stdout


def test_kubernetes_manifests_validate_strictly():
    manifests = sorted(str(p) for p in (DOCKER / "k8s").glob("*.yaml"))
    result = run(tool("kubernetes-validate"), "--strict", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(manifests)


def test_container_entrypoint_is_generated_from_the_launchers_flags():
    from bert_recsys.server.container import render
    from bert_recsys.server.launcher import common_flags

    script = (DOCKER / "serve.sh").read_text()
    assert script == render(), "docker/serve.sh is stale: run `python -m bert_recsys.server.container`"
    for flag in common_flags("${TRITON_ADMIN_KEY}"):  # every flag `make serve` uses, the key left to the container
        assert f'"{flag}"' in script
    assert f"{RESTRICTED_APIS}:triton-admin-key=${{TRITON_ADMIN_KEY}}" in script
    result = subprocess.run([sys.executable, "-m", "bert_recsys.server.container", "--check"], cwd=settings.REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_grafana_dashboard_covers_the_required_panels():
    from monitoring_queries import dashboard_queries

    exprs = " ".join(expr for name, _, expr in dashboard_queries() if name == "triton.json")
    for metric in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us", "nv_inference_exec_count", "nv_gpu_utilization"):
        assert metric in exprs


def test_shell_scripts_parse():
    for script in [*DOCKER.glob("*.sh"), *(DOCKER / "k8s").glob("*.sh")]:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    assert shutil.which("bash")
