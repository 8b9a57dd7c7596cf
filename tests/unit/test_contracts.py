"""The boundaries between the stages: imports only go down the layers, the client stays free of the export
and serving stacks, errors are never told apart by their text, channel names live in one enum."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

from bert_recsys import settings

ROOT = settings.REPO_ROOT
PACKAGE = "bert_recsys"
# Rooms of the one package (bert_recsys.<room>) and the unshipped areas beside it, by layer:
# env <- settings <- export / model_repository / server <- client <- rollout, gateway, demo_data <- training, demo
# <- cli, loadtest (Locust) <- bench (the benchmarks)
LAYERS = {"env": 0, "settings": 1, "logs": 1, "contracts": 1, "encoders": 1, "export": 2, "model_repository": 2,
          "server": 2, "client": 3, "rollout": 4, "gateway": 4, "demo_data": 4, "training": 5, "demo": 5, "cli": 6, "loadtest":
          6, "bench": 7}
# Where each room's files are in the checkout (pyproject.toml maps the folders to subpackages).
FOLDERS = {"env": "bert_recsys/env.py", "settings": "bert_recsys/settings.py", "logs": "bert_recsys/logs.py", "demo": "bert_recsys/demo.py",
           "demo_data": "bert_recsys/demo_data.py", "cli": "bert_recsys/cli.py"}
# The client is what other services install: it must not pull in the export (torch) or the server side.
CLIENT_MUST_NOT_IMPORT = {"export", "model_repository", "server", "torch", "transformers", "onnx", "onnxruntime"}
# The names the rooms were once imported by: nothing imports them any more (a second copy of a module, and a
# name another distribution could take).
OLD_TOP_LEVEL = set(LAYERS) - {"loadtest", "bench", "cli", "env"}


def sources(package: str):
    path = ROOT / FOLDERS.get(package, package)
    return [path] if not path.is_dir() else sorted(path.rglob("*.py"))


def room(module: str) -> str | None:
    """The room a dotted module name belongs to: bert_recsys.client.triton -> client; loadtest.x -> loadtest."""
    parts = module.split(".")
    if parts[0] == PACKAGE:
        return parts[1] if len(parts) > 1 else PACKAGE
    return parts[0]


def imports(path) -> set[str]:
    """Rooms (and other top-level names) of every module imported anywhere in the file (function-local imports
    included); `from bert_recsys import settings` counts as the room settings."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {room(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == PACKAGE:
                names |= {alias.name for alias in node.names}
            else:
                names.add(room(node.module))
    return names


def top_level_imports(path) -> set[str]:
    """First components of every absolute import, as written."""
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


def test_nothing_imports_a_room_by_its_old_top_level_name():
    folders = {FOLDERS.get(name, name).split("/")[0] for name in LAYERS} | {"tests", "scripts"}
    files = [p for folder in folders for p in (ROOT / folder).rglob("*.py") if "model_repository/models" not in str(p)]
    assert len(files) > 100
    for path in files:
        old = top_level_imports(path) & OLD_TOP_LEVEL
        assert not old, f"{path.relative_to(ROOT)} imports {sorted(old)}: import them from {PACKAGE}"


def test_the_layering_test_sees_a_back_edge(tmp_path):
    """The check itself: a client module importing the server is found, however the import is written."""
    for line in ("from bert_recsys.server.launcher import TritonServer", "import bert_recsys.server.launcher as s",
                 "from bert_recsys import server"):
        probe = tmp_path / "probe.py"
        probe.write_text(line + "\n")
        assert "server" in imports(probe), line


def test_the_client_imports_nothing_of_the_export_or_serving_side():
    for path in sources("client"):
        assert not imports(path) & CLIENT_MUST_NOT_IMPORT, f"{path.relative_to(ROOT)}: {imports(path) & CLIENT_MUST_NOT_IMPORT}"
    modules = [".".join((PACKAGE, *p.relative_to(ROOT).with_suffix("").parts)) for p in sources("client") if p.stem != "__init__"]
    probe = ("import importlib, json, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             "print(json.dumps(sorted({m.split('.')[1] if m.startswith('bert_recsys.') else m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                                           check=True, timeout=120).stdout))
    assert not loaded & CLIENT_MUST_NOT_IMPORT, loaded & CLIENT_MUST_NOT_IMPORT


# `"unknown model" in str(error)`, `"Connect" in text`, `... in response.text`: telling errors apart by words.
BY_TEXT = re.compile(r"""["'][^"']+["']\s+(not\s+)?in\s+(str\((error|exc|e)\)|response\.text|text|error\.message\(\))""")


def test_no_error_is_classified_by_its_message_text():
    for package in ("client", "rollout", "gateway", "loadtest", "bench", "server", "demo"):
        for path in sources(package):
            text = path.read_text()
            assert "unknown model" not in text.lower(), path.relative_to(ROOT)
            match = BY_TEXT.search(text)
            assert match is None, f"{path.relative_to(ROOT)}: {match.group(0)}"


CHANNEL_NAMES = ("cooccurrence", "item2item", "semantic", "popularity")


def test_recall_channel_names_are_written_only_in_their_enum():
    for package in ("client", "rollout", "loadtest", "bench", "training", "demo"):
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


def test_gate_figures_are_typed_and_keep_what_they_do_not_know():
    from bert_recsys.contracts.manifest import GateFigures

    data = {"cosine_min": 0.9991, "spearman_ratio_confirmation": 1.0005, "gate_set": {"sentences": 64},
            "sts": "STS-B dev", "a_future_figure": 3}
    figures = GateFigures.from_json(data)
    assert figures.cosine_min == 0.9991 and figures.spearman_ratio_confirmation == 1.0005
    assert figures.retrieval_ndcg_ratio is None and figures.other == {"a_future_figure": 3}
    assert figures.to_json() == data


def test_the_suite_builds_in_its_own_directory_not_the_developers_build():
    """tests/conftest.py points BUILD_DIR at .test-build before any setting is read."""
    assert settings.BUILD_DIR == ROOT / ".test-build" and settings.EXPORT_DIR == ROOT / ".test-build" / "export"
    assert not settings.BUILD_DIR.is_relative_to(ROOT / "build")


def module_files() -> dict:
    """{dotted module name: file} for every module of bert_recsys, from pyproject.toml's folder mapping."""
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {}
    for package, folder in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            inner = path.relative_to(ROOT / folder).with_suffix("").parts
            if "models" not in inner:
                found[".".join((package, *inner)).removesuffix(".__init__")] = path
    return found


def import_time_edges(path, modules: set[str]) -> set[str]:
    """The modules of bert_recsys that importing `path` imports at once (module-level statements only: an import
    inside a function runs when it is called, which is how a cycle is broken on purpose)."""
    edges = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        edges |= {name for name in names if name in modules}
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for child in sorted(graph.get(name, ())):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child, path + [child])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]  # the check itself
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    files = module_files()
    graph = {name: import_time_edges(path, set(files)) - {name} for name, path in files.items()}
    assert len(graph) > 60 and graph["bert_recsys.client.triton"]  # the walk sees the package and its edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_unit_tests_mirror_the_package():
    """tests/unit/<room>/ for each room's own tests; package/ for the package as a whole (CLI, env, wheel, data),
    docker/ for the images and manifests; this file and the process guard's test stay at the top."""
    unit = ROOT / "tests" / "unit"
    folders = {p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(LAYERS) | {"package", "docker"}, folders - set(LAYERS) - {"package", "docker"}
    assert {"client", "export", "server", "rollout", "gateway", "bench"} <= folders
    loose = {p.name for p in unit.glob("test_*.py")}
    assert loose == {"test_contracts.py", "test_process_guard.py"}, loose
