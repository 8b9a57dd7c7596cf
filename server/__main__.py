"""python -m server: serve build/model_repository until Ctrl-C / SIGTERM.

Binds to loopback by default. Settings come from settings.ServerSettings (TRITON_HOST, TRITON_HTTP_PORT,
TRITON_GRPC_PORT, TRITON_METRICS_PORT, TRITON_ADMIN_KEY); flags override them.
"""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path

import settings
from server.launcher import ServerError, TritonServer


def main(argv: list[str] | None = None) -> int:
    s = settings.SETTINGS.server
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--repository", type=Path, default=settings.MODEL_REPOSITORY_DIR)
    parser.add_argument("--host", default=s.host, help="bind address (default: %(default)s; never expose admin APIs publicly)")
    parser.add_argument("--http-port", type=int, default=s.http_port)
    parser.add_argument("--grpc-port", type=int, default=s.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=s.metrics_port)
    args = parser.parse_args(argv)
    server_settings = replace(s, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port)
    triton = TritonServer(args.repository, server_settings)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True) or triton.stop())
    try:
        triton.start()
    except ServerError as error:
        print(f"server: error: {error}", file=sys.stderr)
        return 1
    print(f"[server] ready: HTTP {server_settings.http_url}  gRPC {server_settings.grpc_url}  "
          f"metrics {server_settings.host}:{server_settings.metrics_port}")
    if not settings.SETTINGS.server.admin_key:
        key_file = settings.BUILD_DIR / "admin_key"
        key_file.write_text(triton.server.admin_key + "\n")
        key_file.chmod(0o600)
        print(f"[server] model-repository API key (header {s.admin_header}) written to {key_file}")
    print("[server] Ctrl-C or SIGTERM stops it")
    try:
        triton.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()
    code = triton.process.returncode
    print(f"[server] stopped (tritonserver exit status {code})")
    return 0 if stopping or code in (0, -signal.SIGTERM) else code


if __name__ == "__main__":
    sys.exit(main())
