"""`pip install .`: the wheel holds the project's packages and declares only the client's dependencies; in a
fresh venv the client imports and its console script runs, and torch, ONNX and the server stay out."""
from __future__ import annotations

import subprocess
import zipfile
from email.parser import Parser

from bert_recsys import settings

HEAVY = {"torch", "transformers", "sentence-transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
         "nvidia-pytriton", "fastapi", "uvicorn", "locust"}


def requirement_name(line: str) -> str:
    return line.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()


def test_the_wheel_declares_only_the_clients_dependencies(wheel):
    with zipfile.ZipFile(wheel) as zipped:
        names = zipped.namelist()
        meta = Parser().parsestr(zipped.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        entry_points = zipped.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    plain = {requirement_name(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert plain == {"numpy", "scipy", "faiss-cpu", "tritonclient", "tqdm", "typer"}
    assert not plain & HEAVY
    extras = set(meta.get_all("Provides-Extra"))
    assert {"export", "serve", "gateway", "rollout", "reports", "loadtest"} <= extras
    # One import name: bert_recsys and its .dist-info, nothing else at the top of site-packages.
    assert {n.split("/")[0] for n in names} == {"bert_recsys", next(n.split("/")[0] for n in names if ".dist-info/" in n)}
    assert {"bert_recsys/client/experiments/events.py", "bert_recsys/settings.py", "bert_recsys/logs.py",
            "bert_recsys/export/gate_sentences.txt", "bert_recsys/model_repository/models/tokenizer/model.py",
            "bert_recsys/training/finetune.py", "bert_recsys/gateway/app.py"} <= set(names)
    assert not [n for n in names if "/loadtest/" in n or "/tests/" in n or n.endswith((".onnx", ".pyc"))]
    scripts = [line.split("=")[0].strip() for line in entry_points.split("[console_scripts]")[1].strip().splitlines()
               if "=" in line]
    assert scripts == ["bert-recsys"], scripts  # one command line; the per-stage scripts are gone


def test_pip_install_in_a_fresh_venv_gives_a_working_client_without_torch(installed, tmp_path):
    venv = installed
    python = venv / "bin" / "python"
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            timeout=120).stdout
    assert not {line.split("==")[0].lower() for line in listed.split()} & HEAVY
    probe = ("import sys, bert_recsys.client.recommend, bert_recsys.client.triton, bert_recsys.client.experiments, "
             "bert_recsys.client.evaluate\n"
             "from bert_recsys.client.experiments import Experiment, Arm\n"
             "print(Experiment('x', (Arm('a'), Arm('b'))).assign(42).name in ('a', 'b'), "
             "sorted(m for m in ('torch', 'onnxruntime', 'bert_recsys.server', 'bert_recsys.export') if m in sys.modules))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.split() == ["True", "[]"], result.stderr[-2000:]
    script = subprocess.run([str(venv / "bin" / "bert-recsys"), "experiments", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert script.returncode == 0 and "register" in script.stdout, script.stderr[-2000:]
    listed = subprocess.run([str(venv / "bin" / "bert-recsys"), "--help"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert listed.returncode == 0 and all(f" {name} " in listed.stdout for name in ("export", "serve", "demo", "bench")), listed.stdout
    # Installed defaults point at the working directory, never into a checkout or site-packages.
    where = subprocess.run([str(venv / "bin" / "bert-recsys"), "env"], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    values = {line.split()[0]: line.split()[1] for line in where.stdout.splitlines() if len(line.split()) > 2}
    assert values["BUILD_DIR"] == str(tmp_path / "build"), where.stdout
    assert values["SHARED_DATA_DIR"] == str(tmp_path / "shared" / "data"), where.stdout
    # From site-packages, with no checkout: the bench area is not shipped, and the command says so.
    bench = subprocess.run([str(venv / "bin" / "bert-recsys"), "bench", "serving"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert bench.returncode == 2 and "checkout" in bench.stderr, (bench.returncode, bench.stderr[-2000:])


def test_every_room_folder_is_a_listed_subpackage():
    """pyproject.toml maps each room's folder to bert_recsys.<room> and lists the packages by hand: a new
    subfolder with an __init__.py that is not listed would be missing from the wheel."""
    import tomllib

    tool = tomllib.loads((settings.REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping, listed = tool["package-dir"], set(tool["packages"])
    found = set()
    for package, folder in mapping.items():
        for init in (settings.REPO_ROOT / folder).rglob("__init__.py"):
            if "models" in init.relative_to(settings.REPO_ROOT / folder).parts:
                continue  # model_repository/models/*: Triton's model.py files, shipped as data
            inner = init.parent.relative_to(settings.REPO_ROOT / folder).parts
            found.add(".".join((package, *inner)))
    assert found == listed, (found - listed, listed - found)
    assert set(mapping) <= listed and "bert_recsys" in mapping
