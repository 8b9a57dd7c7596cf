"""Images that would really start: each Dockerfile's COPY lines are replayed into a temporary root, and every
Python entry point of the image is imported there with only those files on the path (third-party packages come
from this machine's venvs, standing in for the image's pip install). No Docker engine is needed."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bert_recsys import settings

ROOT = settings.REPO_ROOT
DOCKER = ROOT / "docker"
# Which interpreter stands in for the image's packages: Locust lives in its own venv (settings.LOADTEST_PYTHON).
INTERPRETER = {"Dockerfile.loadtest": settings.LOADTEST_PYTHON}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    parsed = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]
    last_from = max(i for i, (op, _) in enumerate(parsed) if op == "FROM")
    return parsed[last_from:]


def replay_copies(dockerfile: Path, root: Path) -> tuple[Path, dict]:
    """Copies what the final stage's COPY lines copy from the build context (the repository) into `root` (the
    image's /). -> (the WORKDIR in effect at the end, the ENV it sets)."""
    workdir, env = Path("/"), {}
    for op, args in instructions(dockerfile):
        if op == "WORKDIR":
            workdir = workdir / args
        elif op == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
        elif op == "COPY" and not args.startswith("--from"):
            parts = json.loads(args) if args.startswith("[") else shlex.split(args)
            parts = [p for p in parts if not p.startswith("--")]
            sources, dest = parts[:-1], parts[-1]
            target = Path(dest) if dest.startswith("/") else workdir / dest
            for source in sources:
                origin = ROOT / source
                assert origin.exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
                into = root / target.relative_to("/")
                if dest.endswith("/") or len(sources) > 1:
                    into = into / origin.name
                into.parent.mkdir(parents=True, exist_ok=True)
                if origin.is_dir():
                    shutil.copytree(origin, into, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(origin, into)
    return workdir, env


def entry_points(dockerfile: Path, root: Path) -> list[tuple[str, str]]:
    """("module", name) or ("file", path-in-image) for each Python program the image's ENTRYPOINT runs, following
    shell scripts it copied in."""
    entry = next((json.loads(args) for op, args in instructions(dockerfile) if op == "ENTRYPOINT"), [])
    found = []

    def scan(command: list[str]):
        for i, word in enumerate(command):
            if word == "-m" and i + 1 < len(command):
                found.append(("module", command[i + 1]))
            if word == "-f" and i + 1 < len(command) and command[i + 1].endswith(".py"):
                found.append(("file", command[i + 1]))
        if command and command[0].endswith(".sh"):
            script = root / command[0].lstrip("/")
            assert script.exists(), f"{dockerfile.name}: the entrypoint {command[0]} is not copied into the image"
            assert script.stat().st_mode & 0o111, f"{dockerfile.name}: {command[0]} is not executable"
            for line in script.read_text().splitlines():
                if re.match(r"\s*(exec\s+)?python3?\s", line):
                    scan(shlex.split(re.sub(r"\$\{[^}]*\}", "", line).replace("exec ", "", 1)))

    scan(entry)
    return found


PROBE = """
import importlib, importlib.util, sys
repo = sys.argv[1]
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != repo]    # nothing of the checkout's own code,
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "") or f)]  # nor its editable install
sys.path.insert(0, sys.argv[2])                                        # the image's PYTHONPATH / WORKDIR
for spec in sys.argv[3:]:
    name = spec.split(":", 1)[1]
    found = importlib.util.find_spec(name)
    if found is None:
        raise SystemExit(f"no module {name}")
    if found.submodule_search_locations:  # python -m package runs package.__main__
        importlib.import_module(name + ".__main__")
    else:
        importlib.import_module(name)
print("ok")
"""


def compose_environment(dockerfile: Path) -> dict:
    """The environment compose.yaml runs the image with (its first service built from this Dockerfile)."""
    import yaml

    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for service in services.values():
        if service.get("build", {}).get("dockerfile", "").endswith(dockerfile.name):
            return {k: str(v) for k, v in (service.get("environment") or {}).items()}
    return {}


def import_in_image(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    root = tmp_path / "image"
    workdir, env = replay_copies(dockerfile, root)
    points = entry_points(dockerfile, root)
    assert points, f"{dockerfile.name}: no Python entry point found"
    path = root / env.get("PYTHONPATH", str(workdir)).lstrip("/")
    modules = []
    for kind, name in points:
        if kind == "file":  # a script path inside the image: import it as the module it is under PYTHONPATH
            inside = root / name.lstrip("/")
            assert inside.exists(), f"{dockerfile.name}: {name} is not copied into the image"
            modules.append("module:" + ".".join(inside.relative_to(path).with_suffix("").parts))
        else:
            modules.append(f"module:{name}")
    python = str(INTERPRETER.get(dockerfile.name, sys.executable))
    return subprocess.run([python, "-c", PROBE, str(ROOT), str(path), *modules], cwd=root / workdir.relative_to("/"),
                          capture_output=True, text=True, timeout=300,
                          env={**env, **compose_environment(DOCKER / dockerfile.name), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path), "BUILD_DIR": str(tmp_path / "build")})


PYTHON_IMAGES = ["Dockerfile.loadtest", "Dockerfile.gateway", "Dockerfile.export"]


@pytest.mark.parametrize("name", PYTHON_IMAGES)
def test_every_entry_point_imports_from_only_what_the_image_copies(name, tmp_path):
    result = import_in_image(DOCKER / name, tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), \
        f"{name}: an entry point does not import from the files the image copies:\n{result.stderr[-3000:]}"


def test_the_probe_catches_a_file_the_image_forgot(tmp_path):
    """The check itself: the gateway image without its COPY of bert_recsys/logs.py must fail."""
    broken = tmp_path / "Dockerfile.gateway"
    broken.write_text((DOCKER / "Dockerfile.gateway").read_text().replace("bert_recsys/settings.py bert_recsys/logs.py ./bert_recsys/", "bert_recsys/settings.py ./bert_recsys/"))
    result = import_in_image(broken, tmp_path)
    assert result.returncode != 0 and re.search(r"cannot import name 'logs' from 'bert_recsys'|No module named 'bert_recsys.logs'", result.stderr)


def test_the_serving_image_copies_its_entrypoint():
    root_copies = [args for op, args in instructions(DOCKER / "Dockerfile.serve") if op == "COPY"]
    assert any("docker/serve.sh" in args for args in root_copies)
    assert (DOCKER / "serve.sh").stat().st_mode & 0o111
