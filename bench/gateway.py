"""bert-recsys bench gateway (`make bench-gateway`): what the HTTP gateway costs over direct gRPC `embed`.

Starts its own tritonserver (onnx-int8, free loopback ports) and the gateway as a separate process
(`bert-recsys gateway`, as `make gateway` runs it), then, in one run:
- b1: `embed` of one text, direct gRPC and through two gateways, one reaching Triton over HTTP (the default,
  client/kserve_http.py) and one over gRPC asyncio, interleaved; p50/p99 and each one's overhead;
- b32: throughput at 4 concurrent callers, direct vs the default gateway (float JSON and base64, what the openai
  SDK asks);
- rate limiter: 50 concurrent callers on one key against a configured rate; the admitted rate after the burst.
Writes build/reports/gateway_bench.json and gateway_bench.png (the b1 latency distributions).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.client.triton import TritonClient
from bert_recsys.contracts.machine import machine
from bert_recsys.server.launcher import free_port
from bench.served import serve_variant

log = logs.get("loadtest")
KEY = "gateway-bench-key"
TEXT = "A heartwarming animated adventure about toys that come alive."


class Http:
    """One keep-alive connection, as a pooled application client would hold."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        self.connection.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {KEY}",
                                                                 "Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, response.read()


def percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.array(seconds)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "n": len(ms)}


def plot(timings: dict[str, list[float]], title: str, path: Path) -> Path:
    """The b1 latency of each path as a cumulative distribution, the medians marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"direct": "direct gRPC (tritonclient)", "gateway": "gateway, HTTP to Triton (default)",
              "gateway_grpc": "gateway, gRPC asyncio to Triton"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in timings.items():
        ms = np.sort(1000 * np.array(values))
        line, = ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=f"{labels.get(name, name)}: p50 "
                                                                         f"{np.percentile(ms, 50):.2f} ms")
        ax.axvline(np.percentile(ms, 50), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlim(right=float(np.percentile(1000 * np.concatenate([np.array(v) for v in timings.values()]), 99)))
    ax.set_xlabel("b1 `embed` round trip (ms), one text")
    ax.set_ylabel("fraction of calls")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput(call, workers: int, seconds: float) -> float:
    """Calls per second over `seconds` with `workers` threads, each with its own state from `call()`."""
    counts, stop = [0] * workers, threading.Event()

    def loop(i):
        do = call()
        while not stop.is_set():
            do()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def start_gateway(server, port: int, rate_rps: float, out: Path, protocol: str = "http") -> subprocess.Popen:
    env = {**os.environ, "GATEWAY_API_KEYS": KEY, "GATEWAY_PORT": str(port), "GATEWAY_TRITON_URL": server.grpc_url,
           "GATEWAY_TRITON_HTTP_URL": server.http_url, "GATEWAY_EMBED_PROTOCOL": protocol,
           "GATEWAY_RATE_RPS": str(rate_rps), "GATEWAY_RATE_TEXTS_PER_S": "1000000", "GATEWAY_BURST_S": "1"}
    process = subprocess.Popen([sys.executable, "-m", "bert_recsys.gateway"], cwd=settings.REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=open(out / f"gateway-{port}.log", "w"))
    try:
        wait_http(process, port, "/health/ready", 60, out / f"gateway-{port}.log")
        return process
    except BaseException:  # never leave the gateway behind, whatever stopped the wait
        stop(process)
        raise


def wait_http(process: subprocess.Popen, port: int, path: str, timeout_s: float, log_path: Path) -> None:
    """Until GET `path` on loopback `port` answers 200; an error naming the log's last lines if `process` exits
    first, or when `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} ({log_path}): "
                               f"{' | '.join(tail)[-300:]}")
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            probe.request("GET", path)
            if probe.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            probe.close()
        time.sleep(0.2)
    raise RuntimeError(f"no answer on 127.0.0.1:{port}{path} within {timeout_s:.0f} s ({log_path})")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400, help="b1 calls per path (interleaved)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each throughput window")
    parser.add_argument("--limit-rps", type=float, default=40.0, help="configured rate for the limiter check")
    parser.add_argument("--limit-users", type=int, default=50)
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports")
    args = parser.parse_args(argv)
    logs.configure()
    args.out.mkdir(parents=True, exist_ok=True)
    work = settings.BUILD_DIR / "gateway_bench"
    result = {"machine": machine()}
    with serve_variant("onnx-int8", work, admin_key="") as triton:
        server = triton.server
        client_settings = replace(settings.SETTINGS, server=server)
        direct = TritonClient(server.grpc_url, settings=client_settings)
        port, grpc_port = free_port(), free_port()
        gateway = start_gateway(server, port, rate_rps=1e6, out=work)
        via_grpc = None
        try:
            via_grpc = start_gateway(server, grpc_port, rate_rps=1e6, out=work, protocol="grpc")
            web = {"gateway": Http(port), "gateway_grpc": Http(grpc_port)}
            batch = [f"{TEXT} ({i})" for i in range(32)]
            for _ in range(20):  # warm every path
                direct.embed([TEXT])
                for connection in web.values():
                    connection.post("/v1/embeddings", {"model": "embed", "input": TEXT})
            timings = {"direct": [], "gateway": [], "gateway_grpc": []}
            order = list(timings)
            for i in range(args.samples):
                for path in order[i % 3:] + order[:i % 3]:  # each path first, second and last in turn
                    started = time.perf_counter()
                    if path == "direct":
                        direct.embed([TEXT])
                    else:
                        status, _ = web[path].post("/v1/embeddings", {"model": "embed", "input": TEXT})
                        assert status == 200, status
                    timings[path].append(time.perf_counter() - started)
            stop(via_grpc)
            via_grpc = None
            b1 = {path: percentiles(values) for path, values in timings.items()}
            for name, path in (("", "gateway"), ("grpc_", "gateway_grpc")):
                b1[f"{name}overhead_p50_ms"] = round(b1[path]["p50_ms"] - b1["direct"]["p50_ms"], 3)
                b1[f"{name}overhead_p99_ms"] = round(b1[path]["p99_ms"] - b1["direct"]["p99_ms"], 3)
            b1["gateway_upstream"] = "http"
            result["b1"] = b1
            plot(timings, result["machine"], args.out / "gateway_bench.png")
            log.info("b1: direct p50 %.2f ms; gateway (HTTP to Triton) p50 %.2f ms, overhead %.2f ms p50, %.2f ms p99; "
                     "gateway (gRPC to Triton) p50 %.2f ms, overhead %.2f ms p50, %.2f ms p99",
                     b1["direct"]["p50_ms"], b1["gateway"]["p50_ms"], b1["overhead_p50_ms"], b1["overhead_p99_ms"],
                     b1["gateway_grpc"]["p50_ms"], b1["grpc_overhead_p50_ms"], b1["grpc_overhead_p99_ms"])

            def direct_call():
                own = TritonClient(server.grpc_url, settings=client_settings)
                return lambda: own.embed(batch)

            def gateway_call(encoding):
                def make():
                    own = Http(port)
                    return lambda: own.post("/v1/embeddings", {"model": "embed", "input": batch, "encoding_format": encoding})
                return make

            rates = {"direct": throughput(direct_call, 4, args.seconds),
                     "gateway_float": throughput(gateway_call("float"), 4, args.seconds),
                     "gateway_base64": throughput(gateway_call("base64"), 4, args.seconds)}
            result["b32"] = {name: round(32 * rate, 1) for name, rate in rates.items()} | {
                "unit": "sentences/s, 4 concurrent callers",
                "ratio_float": round(rates["gateway_float"] / rates["direct"], 3),
                "ratio_base64": round(rates["gateway_base64"] / rates["direct"], 3)}
            log.info("b32: %s", result["b32"])
        finally:
            for process in (gateway, via_grpc):
                if process is not None:
                    stop(process)
            direct.close()

        limited_port = free_port()
        limited = start_gateway(server, limited_port, rate_rps=args.limit_rps, out=work)
        try:
            statuses: list[tuple[float, int]] = []
            stop_event = threading.Event()

            def hammer():
                own = Http(limited_port)
                while not stop_event.is_set():
                    status, _ = own.post("/v1/embeddings", {"model": "embed", "input": "x"})
                    statuses.append((time.perf_counter(), status))
                    if status == 429:
                        time.sleep(0.01)

            threads = [threading.Thread(target=hammer) for _ in range(args.limit_users)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            time.sleep(args.seconds * 2)
            stop_event.set()
            for thread in threads:
                thread.join()
            # After the first second (the burst: one second of the rate), the admitted rate is the limiter's.
            settled = [s for t, s in statuses if t - started >= 1.0]
            window = max(t for t, _ in statuses) - (started + 1.0)
            admitted = sum(1 for s in settled if s == 200) / window
            result["rate_limit"] = {"configured_rps": args.limit_rps, "users": args.limit_users,
                                    "admitted_rps": round(admitted, 2),
                                    "error": round(admitted / args.limit_rps - 1, 4),
                                    "rejected_429": sum(1 for s in settled if s == 429),
                                    "other": sorted({s for s in settled if s not in (200, 429)})}
            log.info("rate limit: %s", result["rate_limit"])
        finally:
            stop(limited)
    (args.out / "gateway_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
