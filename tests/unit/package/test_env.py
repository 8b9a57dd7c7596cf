"""Settings are read when asked, through one registry (bert_recsys/env.py): importing never reads the environment,
a bad value is an error naming the variable and the value from the command that needs it, and the docs' table is
generated from the registry."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bert_recsys import env, settings

ROOT = settings.REPO_ROOT
SCRIPT = Path(sys.executable).parent / "bert-recsys"


def bad_value(var: env.Var) -> str | None:
    """A value the variable's parser must refuse (None for free text and paths, which take anything)."""
    return {"int": "abc", "float": "x", "port": "abc", "bool": "maybe", "choice": "nope"}.get(var.kind)


def package_modules() -> list[str]:
    """Every module of bert_recsys (the rooms are not under bert_recsys/), python -m entry points left out: they
    run on import."""
    from tests.unit.test_contracts import module_files

    return sorted(name for name in module_files() if not name.endswith(".__main__"))


def test_importing_every_module_of_the_package_reads_no_environment():
    """With every typed variable set to garbage, every module of bert_recsys still imports."""
    broken = {name: bad_value(v) for name, v in env.REGISTRY.items() if bad_value(v) is not None}
    assert {"TRITON_HTTP_PORT", "TOKENIZER_INSTANCES", "ENCODER_DEVICE", "GATEWAY_PORT", "LOG_LEVEL"} <= set(broken)
    modules = package_modules()
    assert len(modules) > 60 and "bert_recsys.client.triton" in modules and "bert_recsys.cli" in modules
    probe = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", probe, *modules], capture_output=True, text=True, timeout=600,
                            cwd="/", env={**os.environ, **broken})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_a_bad_value_stops_the_command_that_needs_it_with_exit_2_naming_it():
    result = subprocess.run([str(SCRIPT), "serve"], capture_output=True, text=True, timeout=120, cwd="/",
                            env={**os.environ, "TRITON_HTTP_PORT": "abc"})
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "TRITON_HTTP_PORT='abc'" in result.stderr and "not an integer" in result.stderr
    gateway = subprocess.run([str(SCRIPT), "gateway"], capture_output=True, text=True, timeout=120, cwd="/",
                             env={**os.environ, "GATEWAY_CANARY_SHARE": "1.5"})
    assert gateway.returncode != 0 and "GATEWAY_CANARY_SHARE='1.5': must be <= 1" in gateway.stderr


def test_a_settings_object_made_later_sees_a_changed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_HTTP_PORT", "9100")
    monkeypatch.setenv("ENCODER_CUDA_GRAPHS", "off")
    assert settings.SETTINGS.server.http_port == 9100 and settings.Settings().instances.cuda_graphs is False
    monkeypatch.setenv("TRITON_HTTP_PORT", "9200")
    assert settings.ServerSettings().http_port == 9200
    monkeypatch.setenv("BUILD_DIR", str(tmp_path))
    assert settings.EXPORT_DIR == tmp_path / "export"
    monkeypatch.setenv("TOKENIZER_INSTANCES", "0")
    with pytest.raises(env.SettingsError, match=r"TOKENIZER_INSTANCES='0': must be >= 1"):
        settings.Settings()


@pytest.mark.parametrize("kind,raw,expected", [("bool", "YES", True), ("bool", "0", False), ("port", " 8080 ", 8080),
                                                ("float", "0.25", 0.25), ("choice", "debug", "DEBUG")])
def test_values_parse_by_kind(kind, raw, expected, monkeypatch):
    var = env.Var("X_TEST", kind, None, "", "test", choices=("DEBUG", "INFO") if kind == "choice" else ())
    monkeypatch.setenv("X_TEST", raw)
    assert var.get() == expected


@pytest.mark.parametrize("kind,raw,reason", [("bool", "maybe", "not a boolean"), ("port", "70000", "1..65535"),
                                              ("int", "1.5", "not an integer"), ("choice", "loud", "choose from")])
def test_bad_values_name_the_variable_the_value_and_why(kind, raw, reason, monkeypatch):
    var = env.Var("X_TEST", kind, None, "", "test", choices=("DEBUG", "INFO") if kind == "choice" else ())
    monkeypatch.setenv("X_TEST", raw)
    with pytest.raises(env.SettingsError) as caught:
        var.get()
    assert caught.value.name == "X_TEST" and caught.value.value == raw and reason in str(caught.value)


def test_unset_and_empty_give_the_default(monkeypatch):
    monkeypatch.delenv("TRITON_GRPC_PORT", raising=False)
    assert env.TRITON_GRPC_PORT.get() == 8001
    monkeypatch.setenv("TRITON_GRPC_PORT", "")
    assert env.TRITON_GRPC_PORT.get() == 8001
    monkeypatch.setenv("TRITON_ADMIN_KEY", "")
    assert env.TRITON_ADMIN_KEY.get() == ""


def test_the_docs_table_is_generated_from_the_registry():
    assert (ROOT / "docs" / "environment.md").read_text() == env.markdown(), \
        "docs/environment.md is stale: bert-recsys env --markdown > docs/environment.md"


def environment_names_read_in(path: Path) -> set[str]:
    """Names of environment variables a file reads with os.environ.get / os.getenv / os.environ[...] / `in`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv") and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value)
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" and isinstance(node.slice, ast.Constant):
            if isinstance(node.ctx, ast.Load):
                names.add(node.slice.value)
    return names


def test_the_package_reads_the_environment_only_through_the_registry():
    """No module of bert_recsys (nor the bench area) reads one of our variables around the registry."""
    folders = ["bert_recsys", "client", "contracts", "encoders", "export", "model_repository", "server", "rollout",
               "gateway", "training", "loadtest", "bench"]
    outside = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "env.py" or "model_repository/models" in str(path):
                continue
            ours = environment_names_read_in(path) - {"PATH", "HOME", "XDG_CACHE_HOME", "LD_LIBRARY_PATH", "PYTHONPATH"}
            if ours:
                outside[str(path.relative_to(ROOT))] = ours
    assert not outside, f"read around bert_recsys/env.py: {outside}"
    assert set(env.REGISTRY) >= {"TRITON_HOST", "GATEWAY_PORT", "LOADTEST_TASKS", "DEMO_DOWNLOAD", "BUILD_DIR"}


def test_env_command_shows_each_variable_and_flags_a_bad_one():
    result = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GATEWAY_PORT": "eighty", "TRITON_ADMIN_KEY": "secret"})
    assert result.returncode == 1
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == set(env.REGISTRY)
    assert "error: not an integer" in lines["GATEWAY_PORT"] and "secret" not in result.stdout
