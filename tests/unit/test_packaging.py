"""`pip install .`: the wheel holds the project's packages and declares only the client's dependencies; in a
fresh venv the client imports and its console script runs, and torch, ONNX and the server stay out."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest

import settings

HEAVY = {"torch", "transformers", "sentence-transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
         "nvidia-pytriton", "fastapi", "uvicorn", "locust"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "project"
    # Built from a copy of the sources (setuptools writes build/ and *.egg-info beside them) with this venv's
    # setuptools (no download); nothing is written into the checkout.
    shutil.copytree(settings.REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "__pycache__", "*.egg-info", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def requirement_name(line: str) -> str:
    return line.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()


def test_the_wheel_declares_only_the_clients_dependencies(wheel):
    with zipfile.ZipFile(wheel) as zipped:
        names = zipped.namelist()
        meta = Parser().parsestr(zipped.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        entry_points = zipped.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    plain = {requirement_name(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert plain == {"numpy", "scipy", "faiss-cpu", "tritonclient", "tqdm"}
    assert not plain & HEAVY
    extras = set(meta.get_all("Provides-Extra"))
    assert {"export", "serve", "gateway", "rollout", "reports", "loadtest"} <= extras
    assert {"client/experiments/events.py", "settings.py", "logs.py", "export/gate_sentences.txt",
            "model_repository/models/tokenizer/model.py"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "build/", "docker/")) or n.endswith((".onnx", ".pyc"))]
    for script in ("bert-recsys-experiments", "bert-recsys-evaluate", "bert-recsys-serve", "bert-recsys-rollout"):
        assert script in entry_points


def test_pip_install_in_a_fresh_venv_gives_a_working_client_without_torch(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                               timeout=900, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            timeout=120).stdout
    assert not {line.split("==")[0].lower() for line in listed.split()} & HEAVY
    probe = ("import sys, client.recommend, client.triton, client.experiments, client.evaluate\n"
             "from client.experiments import Experiment, Arm\n"
             "print(Experiment('x', (Arm('a'), Arm('b'))).assign(42).name in ('a', 'b'), "
             "sorted(m for m in ('torch', 'onnxruntime', 'server', 'export') if m in sys.modules))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.split() == ["True", "[]"], result.stderr[-2000:]
    script = subprocess.run([str(venv / "bin" / "bert-recsys-experiments"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert script.returncode == 0 and "register" in script.stdout
