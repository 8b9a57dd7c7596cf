"""Starts the real tritonserver on a built model repository, and stops it cleanly.

The binary and the Python backend come from the `nvidia-pytriton` wheel (tritonserver 2.51), so no Docker
is needed. Two things make its Python backend work from a venv:
- the stub for this Python version is linked into a backend directory of ours (build/triton_backends);
- the venv's bin goes first on PATH: the stub finds its interpreter, and our packages, through it
  (it ignores PYTHONPATH).
The stub must not write `__pycache__` into version directories: a polling server takes that for a change and
reloads a second time, and an explicit load of an unchanged model would reload it. The stub's embedded
interpreter ignores PYTHON* variables (PYTHONDONTWRITEBYTECODE too: tested), so a one-line .pth file in the
venv turns bytecode writing off in any Python process that has TRITON_STUB_NO_PYCACHE=1, which only the
servers started here have.

The launcher owns what it starts (server/processes.py): the server gets a shared-memory prefix of its own, its
stubs and regions are ended and removed whenever it exits, for any reason, and a record in build/run lets the
next launcher reap what a killed launcher left. tritonserver also gets a parent-death signal, so it stops when
the thread that started it dies. A supervisor thread (server/supervisor.py) reloads a model whose stub died.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.server import processes
from bert_recsys.server.supervisor import ModelSupervisor
from bert_recsys.settings import ServerSettings

log = logs.get("server")

# Model load/unload, shared-memory registration, tracing and log settings need the key. Health,
# metadata, config (it carries the export manifest), statistics and inference stay open.
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"


class ServerError(RuntimeError):
    pass


def common_flags(admin_key: str, admin_header: str = ServerSettings.admin_header) -> list[str]:
    """The flags every tritonserver of this project runs with: `make serve` here, and the container's entrypoint
    (docker/serve.sh is generated from this by server/container.py, and a test keeps them equal)."""
    restricted = f"{RESTRICTED_APIS}:{admin_header}={admin_key}"
    return [
        "--model-control-mode=explicit",
        "--load-model=*",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--allow-metrics=true",
        # Latency quantiles (p50/p90/p95/p99) per model, beside the cumulative counters: what p99 panels read.
        "--metrics-config=summary_latencies=true",
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and benchmarks that run their own server)."""
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def on_free_ports(server: ServerSettings, **overrides) -> ServerSettings:
    """`server` on loopback with unused HTTP, gRPC and metrics ports (a test's, benchmark's or validation's own)."""
    return replace(server, **{"host": "127.0.0.1", "http_port": free_port(), "grpc_port": free_port(),
                              "metrics_port": free_port(), **overrides})


def grpc_admin_headers(key: str, header: str = ServerSettings.admin_header) -> dict[str, str]:
    """The admin key as Triton's gRPC frontend expects it: the header name gets a fixed prefix."""
    return {f"triton-grpc-protocol-{header}": key}


# Runs in the child between fork and tritonserver: ask the kernel for SIGTERM when our parent thread dies, check
# the parent did not die first, then become tritonserver (same pid). SIGTERM lets tritonserver unload its models
# and end its stubs itself. A wrapper rather than Popen's preexec_fn: preexec_fn makes Python fork() instead of
# vfork(), and a fork() while gRPC calls are in flight hung a gRPC client of this process (seen in a rollout test).
TIED_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "sys.exit(1) if os.getppid() != int(sys.argv[1]) else os.execv(sys.argv[2], sys.argv[2:])\n"
)


def tied_to_parent(command: list[str]) -> list[str]:
    """`command`, run so that it gets SIGTERM when the calling thread (here: the main thread) dies."""
    return [sys.executable, "-S", "-c", TIED_TO_PARENT, str(os.getpid()), *command]


def pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


NO_PYCACHE_HOOK = "triton_stub_no_pycache.pth"
NO_PYCACHE_LINE = ('import os, sys; sys.dont_write_bytecode = sys.dont_write_bytecode or '
                   'os.environ.get("TRITON_STUB_NO_PYCACHE") == "1"\n')


def install_no_pycache_hook() -> Path:
    """The .pth line above, in this interpreter's site-packages (the stub runs this venv's Python)."""
    import sysconfig

    hook = Path(sysconfig.get_paths()["purelib"]) / NO_PYCACHE_HOOK
    if not hook.exists() or hook.read_text() != NO_PYCACHE_LINE:
        try:
            hook.write_text(NO_PYCACHE_LINE)
        except OSError as error:  # a read-only system Python (a lent machine): stubs may then write __pycache__
            log.warning("cannot install %s (%s): model directories may get __pycache__", hook, error.strerror)
    return hook


def prepare_backends(target: Path | None = None) -> Path:
    """A backend directory whose python/ holds the wheel's backend plus the stub for this interpreter."""
    target = Path(target) if target is not None else settings.BUILD_DIR / "triton_backends"
    root = pytriton_root()
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    links = {p.name: p for p in (root / "backends" / "python").iterdir() if p.name != "__pycache__"}
    links[stub.name] = stub
    install_no_pycache_hook()
    for name, source in links.items():
        link = python_dir / name
        if link.is_symlink() or link.exists():
            if link.resolve() == source.resolve():
                continue
            link.unlink()
        link.symlink_to(source)
    return target


@dataclass
class TritonServer:
    """`with TritonServer(repo) as server:` starts tritonserver, waits until ready, and stops it on exit."""

    repository: Path
    server: ServerSettings = field(default_factory=ServerSettings)
    log_file: Path | None = None
    startup_timeout_s: float = 180.0
    extra_args: tuple[str, ...] = ()
    supervise: bool = True        # reload a model whose stub died (server/supervisor.py)
    run_dir: Path = field(default_factory=lambda: settings.BUILD_DIR / "run")
    # Directories put first on the Python stubs' path (e.g. a numpy<2 for stubs on a numpy 2 machine).
    stub_pythonpath: tuple[str, ...] = ()

    def __post_init__(self):
        self.process: subprocess.Popen | None = None
        self.server_id = secrets.token_hex(4)
        self.shm_prefix = processes.shm_prefix_for(self.server_id)
        self.record: processes.ServerRecord | None = None
        self.supervisor: ModelSupervisor | None = None
        self.reaped: processes.Reaped | None = None   # what ending the server took, once it has ended
        self._reap_lock = threading.Lock()
        if not self.server.admin_key:
            # No key configured: make one for this run, so the admin APIs are never open.
            self.server = replace(self.server, admin_key=secrets.token_urlsafe(24))

    @property
    def admin_headers(self) -> dict[str, str]:
        return {self.server.admin_header: self.server.admin_key}

    def command(self) -> list[str]:
        s = self.server
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={prepare_backends()}",
            *common_flags(s.admin_key, s.admin_header),
            f"--http-address={s.host}", f"--http-port={s.http_port}",
            f"--grpc-address={s.host}", f"--grpc-port={s.grpc_port}",
            f"--metrics-address={s.host}", f"--metrics-port={s.metrics_port}",
            # Our own prefix: this server's stubs and /dev/shm regions are recognisable as its own.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["TRITON_STUB_NO_PYCACHE"] = "1"  # read by install_no_pycache_hook's .pth line in the stub
        env["HF_HUB_OFFLINE"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "true")
        if self.stub_pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*map(str, self.stub_pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def start(self) -> "TritonServer":
        embeds = [settings.ModelNames.for_family(f).embed for f in settings.FAMILIES]
        if not any((Path(self.repository) / embed / "config.pbtxt").exists() for embed in embeds):
            raise ServerError(f"{self.repository} is not a built model repository: run `make repository` first")
        runs = processes.RunDirectory(self.run_dir)
        runs.reap_orphans()
        log_handle = open(self.log_file, "ab") if self.log_file else None
        # Only the main thread's death means ours: a parent-death signal tied to a worker thread would stop the
        # server when that thread ends.
        in_main = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            tied_to_parent(self.command()) if in_main else self.command(), env=self.environment(),
            stdout=log_handle or None, stderr=subprocess.STDOUT if log_handle else None,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop Triton in order
        )
        if log_handle:
            log_handle.close()  # the child has its own descriptor
        server = processes.ProcessId.of(self.process.pid) or processes.ProcessId(self.process.pid, -1)
        self.record = processes.ServerRecord(self.server_id, server, processes.ProcessId.of(os.getpid()),
                                             self.shm_prefix, str(Path(self.repository).resolve()), time.time())
        runs.write(self.record)
        threading.Thread(target=self._end_when_exited, name=f"triton-{self.server_id}-reaper", daemon=True).start()
        self.wait_ready()
        if self.supervise:
            self.supervisor = ModelSupervisor(self.shm_prefix, self.server.grpc_url,
                                              grpc_admin_headers(self.server.admin_key, self.server.admin_header)).start()
        return self

    def _end_when_exited(self) -> None:
        self.process.wait()
        self._reap()

    def _reap(self) -> processes.Reaped:
        """Once tritonserver has exited: no stub of it and none of its shared memory stays behind."""
        with self._reap_lock:
            if self.reaped is None:
                if self.supervisor is not None:
                    self.supervisor.stop()
                self.reaped = processes.reap(self.record)
                if self.reaped:
                    log.warning("server %s exited with status %s: ended %d stub(s) (%d needed SIGKILL), removed %d "
                                "shared-memory region(s)", self.server_id, self.process.returncode,
                                self.reaped.terminated + self.reaped.killed, self.reaped.killed, self.reaped.shm_removed)
                processes.RunDirectory(self.run_dir).remove(self.server_id)
            return self.reaped

    def ready(self) -> bool:
        url = f"http://{self.server.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} during start-up"
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready within {self.startup_timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM lets Triton finish in-flight requests and unload models; SIGKILL only if it hangs. Either way,
        nothing of it survives: its stubs are ended and its shared-memory regions removed."""
        if self.process is None:
            return
        if self.supervisor is not None:
            self.supervisor.stop()  # no repairs while the server goes down
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s of SIGTERM: SIGKILL", timeout_s)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reap()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
