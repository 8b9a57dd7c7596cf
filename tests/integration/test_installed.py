"""The installed package, as a user has it: `pip install 'bert-recsys-serving[rollout]'` into a fresh venv, run
from a directory outside the checkout, its client-side commands against a real tritonserver on loopback."""
from __future__ import annotations

import json
import subprocess

from bert_recsys import settings


def test_installed_bert_recsys_runs_client_commands_from_outside_the_checkout(installed, triton, tmp_path):
    server = triton("onnx-int8")
    s = server.server
    environment = {"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "TRITON_HOST": s.host,
                   "TRITON_GRPC_PORT": str(s.grpc_port), "TRITON_HTTP_PORT": str(s.http_port),
                   "TRITON_METRICS_PORT": str(s.metrics_port), "TRITON_ADMIN_KEY": s.admin_key}
    script = installed / "bin" / "bert-recsys"
    result = subprocess.run([str(script), "rollout", "--repository", str(server.repository), "status", "--window", "1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads(result.stdout)
    stable = str(status["stable"])
    assert status["versions"][stable]["variant"] == "onnx-int8"
    assert all(status["versions"][stable]["ready"].values()), status["versions"][stable]["ready"]
    # Everything it imported came from site-packages, not from the checkout.
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import bert_recsys.rollout; print(bert_recsys.rollout.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=environment)
    assert str(installed) in where.stdout and str(settings.REPO_ROOT) not in where.stdout, where.stdout
