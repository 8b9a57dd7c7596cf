"""A short Locust run against the real server (CI's load test): 0 failures, and the report is complete."""
import json
import os
import subprocess

import pytest

from bert_recsys import settings



def run_loadtest(server, out, *args, shared_data=None):
    """`shared_data`: a SHARED_DATA_DIR for the Locust process (its recommend task embeds that MovieLens catalog)."""
    s = server.server
    command = [str(settings.LOADTEST_PYTHON), "-m", "loadtest.run", "--host", s.host, "--http-port", str(s.http_port),
               "--grpc-port", str(s.grpc_port), "--out", str(out), *args]
    env = {**os.environ, **({"SHARED_DATA_DIR": str(shared_data)} if shared_data else {})}
    return subprocess.run(command, cwd=settings.REPO_ROOT, capture_output=True, text=True, timeout=400, env=env)


@pytest.fixture(scope="module")
def small_shared_data(movielens_slice, tmp_path_factory):
    """The 1,500-movie MovieLens slice as a SHARED_DATA_DIR: the recommend task's catalog is embedded in seconds."""
    shared = tmp_path_factory.mktemp("shared")
    (shared / "movielens-latest-small").symlink_to(movielens_slice, target_is_directory=True)
    return shared


@pytest.fixture(scope="module", autouse=True)
def loadtest_venv():
    if not settings.LOADTEST_PYTHON.exists():
        pytest.fail("the load-test venv is missing: `make test` builds it (make loadtest-venv)")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_short_load_has_no_failures(triton, tmp_path, protocol, small_shared_data):
    server = triton("onnx-int8")
    result = run_loadtest(server, tmp_path, "--protocol", protocol, "--users", "3", "--duration", "15",
                          "--slo-failure-rate", "0", shared_data=small_shared_data)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    agg = summary["aggregated"]
    assert agg["requests"] > 50 and agg["failures"] == 0
    assert set(summary["tasks"]) == {"embed", "score", "recommend"}
    assert (tmp_path / "report.html").stat().st_size > 1000 and (tmp_path / "load.png").exists()


def test_a_violated_slo_fails_the_run(triton, tmp_path):
    result = run_loadtest(triton("onnx-int8"), tmp_path, "--users", "1", "--duration", "4", "--tasks", "embed:1",
                          "--slo-p99-ms", "0.01")
    assert result.returncode == 1
    assert "SLO violated: p99" in result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["slo_violations"]
