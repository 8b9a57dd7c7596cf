"""Shared fixtures. The export runs once per session (and is reused across sessions through the recipe
hash in each manifest); integration tests start the real tritonserver on free loopback ports."""
from __future__ import annotations

import csv
import os
import time
import sys
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The suite's own build directory: its fixtures (the session's export, rendered repositories, process records) never
# write into the developer's build/. It is kept between sessions, so the export is reused while up to date. Set
# before anything asks for a setting (settings are read when asked), and inherited by every process a test starts.
TEST_BUILD_DIR = Path(__file__).resolve().parents[1] / ".test-build"
os.environ["BUILD_DIR"] = str(TEST_BUILD_DIR)

from bert_recsys import settings  # noqa: E402
from bert_recsys.server.launcher import on_free_ports  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import process_guard  # noqa: E402

# Nothing the suite starts may outlive it (tests/process_guard.py): each test's leftovers are traced to it.
GUARD = process_guard.ProcessGuard()


def pytest_configure(config):
    GUARD.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    GUARD.current = item.nodeid
    yield
    GUARD.current = ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    GUARD.sample()
    GUARD.observe(item.nodeid)


def pytest_sessionfinish(session, exitstatus):
    GUARD.sample()  # what the session-scoped fixtures' teardown started or left, too
    leftovers, regions = GUARD.leftovers(grace_s=20.0)
    GUARD.stop_sampling()
    writer = session.config.get_terminal_writer()
    if leftovers or regions:
        GUARD.clean(leftovers, regions)
        writer.line(process_guard.report(leftovers, regions), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    lingering = GUARD.lingering()
    if lingering:
        writer.line(process_guard.report_lingering(lingering), yellow=True)
    if GUARD.started:
        record = settings.BUILD_DIR / "test-processes" / time.strftime("%Y%m%d-%H%M%S.json")
        GUARD.write_record(record)
        writer.line(f"{len(GUARD.started)} processes started by the suite, with parent, start time and test: {record}")

# torch-fp16 is left out: its gate computes FP16 on the CPU here (80 s); CI serves torch-fp32 (RUNTIME=torch).
# ov-int8 is left out too: NNCF's calibration takes ~20-60 s here; its quantizer is tested on a small calibration set.
EXPORTED_VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "torch-fp32", "ov-fp32")


@pytest.fixture(scope="session")
def export_dir() -> Path:
    """The suite's export (.test-build/export) with the ONNX variants, gated; built on first use, then reused while
    up to date."""
    from bert_recsys.export.pipeline import ExportOptions, run_export
    from bert_recsys.export.variants import parse_variants

    options = ExportOptions(
        model_dir=settings.default_model_dir(),
        out_dir=settings.EXPORT_DIR,
        variants=parse_variants(",".join(EXPORTED_VARIANTS)),
        sts_path=settings.STSB_DEV,
    )
    outcomes = run_export(options)
    assert all(o.ok for o in outcomes), [(o.variant, o.status, o.detail) for o in outcomes]
    return settings.EXPORT_DIR


@pytest.fixture(scope="session")
def sts_dev():
    from bert_recsys.export.gate import load_sts

    if not settings.STSB_DEV.exists():
        pytest.skip(f"STS-B dev not found at {settings.STSB_DEV}")
    return load_sts(settings.STSB_DEV)


class ServedRepositories:
    """One tritonserver per served variant, started on first request and stopped at session end."""

    def __init__(self, export_dir: Path, root: Path):
        self.export_dir = export_dir
        self.root = root
        self.servers = {}

    def __call__(self, variant: str, runtime: str = "embedded"):
        from bert_recsys.model_repository.render import build_repository
        from bert_recsys.server.launcher import TritonServer

        key = variant if runtime == "embedded" else f"{variant}-{runtime}"
        if key not in self.servers:
            repo = build_repository(settings.SETTINGS, self.export_dir, variant, runtime, self.root / key)
            server_settings = on_free_ports(settings.SETTINGS.server, admin_key="test-admin-key")
            server = TritonServer(repo, server_settings, log_file=self.root / f"{key}.log")
            self.servers[key] = server.start()
        return self.servers[key]

    def stop(self):
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of the sources (setuptools writes build/ and *.egg-info beside them)
    with this venv's setuptools (no download): nothing is written into the checkout."""
    import shutil
    import subprocess

    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "project"
    shutil.copytree(settings.REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", ".test-build", "__pycache__", "*.egg-info", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no checkout on its path) with `pip install 'wheel[rollout]'`, as a user would: -> the venv."""
    import subprocess

    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[rollout]"],
                            capture_output=True, text=True, timeout=900, cwd=venv)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


@pytest.fixture(scope="session")
def triton(export_dir, tmp_path_factory):
    served = ServedRepositories(export_dir, tmp_path_factory.mktemp("repositories"))
    yield served
    served.stop()


@pytest.fixture(params=["grpc", "http"])
def protocol(request):
    return request.param


def client_for(server, protocol: str):
    from bert_recsys.client.triton import TritonClient

    s = server.server
    url = s.grpc_url if protocol == "grpc" else s.http_url
    return TritonClient(url, protocol=protocol, settings=replace(settings.SETTINGS, server=s))


@pytest.fixture(scope="session")
def movielens_slice(tmp_path_factory):
    """The first 1,500 movies and every rating of the first 80 users on them (real data, kept small)."""
    source = settings.MOVIELENS_DIR
    if not (source / "movies.csv").exists():
        pytest.skip(f"MovieLens not found at {source}")
    target = tmp_path_factory.mktemp("movielens")
    with open(source / "movies.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))[:1501]
    with open(target / "movies.csv", "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    keep = {row[0] for row in rows[1:]}
    with open(source / "ratings.csv", encoding="utf-8") as handle, open(target / "ratings.csv", "w") as out:
        for line_number, line in enumerate(handle):
            fields = line.split(",")
            if line_number == 0 or (fields[1] in keep and int(fields[0]) <= 80):
                out.write(line)
    return target
