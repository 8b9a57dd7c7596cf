"""The boundaries between the stages: imports only go down the layers, the client stays free of the export
and serving stacks, errors are never told apart by their text, channel names live in one enum."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

import settings

ROOT = settings.REPO_ROOT
# settings <- export / model_repository / server <- client <- rollout, gateway <- loadtest / training / demo
LAYERS = {"settings": 0, "logs": 0, "contracts": 0, "encoders": 0, "export": 1, "model_repository": 1, "server": 1, "client": 2,
          "rollout": 3, "gateway": 3, "loadtest": 4, "training": 4, "demo": 4, "demo_data": 4}
# The client is what other services install: it must not pull in the export (torch) or the server side.
CLIENT_MUST_NOT_IMPORT = {"export", "model_repository", "server", "torch", "transformers", "onnx", "onnxruntime"}


def sources(package: str):
    path = ROOT / package
    return [ROOT / f"{package}.py"] if not path.is_dir() else sorted(path.rglob("*.py"))


def imports(path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_only_go_down_the_layers(package):
    for path in sources(package):
        if "model_repository/models" in str(path):
            continue  # model.py files run inside Triton's stub with nothing of ours on the path
        for name in imports(path) & set(LAYERS) - {package}:
            assert LAYERS[name] < LAYERS[package], f"{path.relative_to(ROOT)} imports {name} (a back edge)"


def test_the_client_imports_nothing_of_the_export_or_serving_side():
    for path in sources("client"):
        assert not imports(path) & CLIENT_MUST_NOT_IMPORT, f"{path.relative_to(ROOT)}: {imports(path) & CLIENT_MUST_NOT_IMPORT}"
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in sources("client") if p.stem != "__init__"]
    probe = ("import importlib, json, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                                           check=True, timeout=120).stdout))
    assert not loaded & CLIENT_MUST_NOT_IMPORT, loaded & CLIENT_MUST_NOT_IMPORT


# `"unknown model" in str(error)`, `"Connect" in text`, `... in response.text`: telling errors apart by words.
BY_TEXT = re.compile(r"""["'][^"']+["']\s+(not\s+)?in\s+(str\((error|exc|e)\)|response\.text|text|error\.message\(\))""")


def test_no_error_is_classified_by_its_message_text():
    for package in ("client", "rollout", "gateway", "loadtest", "server", "demo"):
        for path in sources(package):
            text = path.read_text()
            assert "unknown model" not in text.lower(), path.relative_to(ROOT)
            match = BY_TEXT.search(text)
            assert match is None, f"{path.relative_to(ROOT)}: {match.group(0)}"


CHANNEL_NAMES = ("cooccurrence", "item2item", "semantic", "popularity")


def test_recall_channel_names_are_written_only_in_their_enum():
    for package in ("client", "rollout", "loadtest", "training", "demo"):
        for path in sources(package):
            if path.name == "recall.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in CHANNEL_NAMES:
                    # client/evaluate.py's baseline systems are named "popularity" and "random": a report key,
                    # not the recall channel.
                    if path.name == "evaluate.py" and node.value == "popularity":
                        continue
                    pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno}: channel name {node.value!r} as a literal")
