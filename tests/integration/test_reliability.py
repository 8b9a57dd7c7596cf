"""tritonserver killed (SIGKILL) under load: clients get a clear error, then recover once it is back."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import replace

import pytest

import settings
from client.triton import RetryPolicy, TritonClient
from model_repository.render import build_repository
from server.launcher import TritonServer, on_free_ports


def stub_processes(repository) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if "triton_python_backend_stub" in line and str(repository) in line]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sigkill_under_load_gives_clear_errors_then_recovers(export_dir, tmp_path, protocol):
    repository = build_repository(settings.SETTINGS, export_dir, "onnx-int8", "embedded", tmp_path / "repository")
    server_settings = on_free_ports(settings.SETTINGS.server, admin_key="k")
    client_settings = replace(settings.SETTINGS, server=server_settings)
    url = server_settings.grpc_url if protocol == "grpc" else server_settings.http_url
    events: list[tuple[float, str, str]] = []  # (time, "ok" | error type, message)
    stop = threading.Event()

    def load():
        client = TritonClient(url, protocol=protocol, settings=client_settings, timeout_s=10,
                              retry=RetryPolicy(attempts=3, initial_backoff_s=0.05))
        while not stop.is_set():
            try:
                client.embed(["the server may die under this request"])
                events.append((time.monotonic(), "ok", ""))
            except Exception as error:  # recorded, not raised: the test inspects what callers saw
                events.append((time.monotonic(), type(error).__name__, str(error)))
                time.sleep(0.1)
        client.close()

    first = TritonServer(repository, server_settings, log_file=tmp_path / "first.log").start()
    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    second = None
    try:
        time.sleep(2)
        killed_at = time.monotonic()
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
        time.sleep(3)
        # The Python backend's stubs notice their parent is gone and exit (no orphans holding memory).
        deadline = time.monotonic() + 60
        while stub_processes(repository) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not stub_processes(repository)
        restarted_at = time.monotonic()
        second = TritonServer(repository, server_settings, log_file=tmp_path / "second.log").start()
        ready_at = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if second is not None:
            second.stop()
    before = [e for e in events if e[0] < killed_at]
    down = [e for e in events if killed_at + 1 < e[0] < restarted_at]
    after = [e for e in events if e[0] > ready_at + 0.5]
    assert before and all(kind == "ok" for _, kind, _ in before)
    # While it is down: every caller gets ServingError naming the call and the retries, nothing else.
    assert down and all(kind == "ServingError" for _, kind, _ in down), {kind for _, kind, _ in down}
    assert all("infer embed failed after 3 attempts" in message for _, _, message in down)
    # Once it is back, the same clients (no restart on their side) succeed again.
    assert len(after) > 20 and all(kind == "ok" for _, kind, _ in after), [m for _, k, m in after if k != "ok"][:3]
    print(f"{protocol}: {len(before)} ok before the kill, {len(down)} clear errors while down "
          f"(e.g. {down[0][2][:120]!r}), {len(after)} ok after the restart "
          f"({ready_at - restarted_at:.1f} s to ready)")
