"""python -m demo (`make demo`): the whole flow once, for real.

export (already done by `make demo`'s prerequisites) -> model repository -> tritonserver on loopback ->
recommendations for a MovieLens user through the real ensembles -> stop the server.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import settings
from server.launcher import ServerError, TritonServer, free_port


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--repository", type=Path, default=settings.MODEL_REPOSITORY_DIR)
    parser.add_argument("--data", type=Path, default=settings.MOVIELENS_DIR, help="MovieLens-format directory")
    parser.add_argument("--user", type=int, default=None, help="MovieLens userId (default: one with a long history)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    args = parser.parse_args(argv)

    from client.demo_flow import run_demo

    server_settings = replace(settings.SETTINGS.server, http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port())
    started = time.perf_counter()
    try:
        with TritonServer(args.repository, server_settings, log_file=settings.BUILD_DIR / "demo_triton.log"):
            print(f"[demo] tritonserver ready in {time.perf_counter() - started:.1f} s on {server_settings.host} "
                  f"(gRPC {server_settings.grpc_port}, HTTP {server_settings.http_port})")
            run_demo(server_settings, args.protocol, args.data, args.user)
    except ServerError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    print("[demo] server stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
