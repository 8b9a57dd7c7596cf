"""python -m server: serve build/model_repository until Ctrl-C / SIGTERM.

    python -m server                                  # serve until stopped
    python -m server --free-ports -- CMD ARGS...      # serve while CMD runs, then stop; CMD sees the
                                                      # server through TRITON_HOST / TRITON_*_PORT

Binds to loopback by default. Settings come from settings.ServerSettings (TRITON_HOST, TRITON_HTTP_PORT,
TRITON_GRPC_PORT, TRITON_METRICS_PORT, TRITON_ADMIN_KEY); flags override them.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import logs
import settings
from server.launcher import ServerError, TritonServer, free_port

log = logs.get("server")


def main(argv: list[str] | None = None) -> int:
    # The project's one log format (logs.py): the launcher, the reaper and the supervisor log through "server".
    logs.configure()
    s = settings.SETTINGS.server
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--repository", type=Path, default=settings.MODEL_REPOSITORY_DIR)
    parser.add_argument("--host", default=s.host, help="bind address (default: %(default)s; never expose admin APIs publicly)")
    parser.add_argument("--http-port", type=int, default=s.http_port)
    parser.add_argument("--grpc-port", type=int, default=s.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=s.metrics_port)
    parser.add_argument("--free-ports", action="store_true", help="pick unused ports instead of the defaults")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...: run CMD against the server, then stop")
    args = parser.parse_args(argv)
    ports = [free_port(), free_port(), free_port()] if args.free_ports else [args.http_port, args.grpc_port, args.metrics_port]
    server_settings = replace(s, host=args.host, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    # With a command, Triton's log goes to a file so the command's stdout stays its own (e.g. JSON).
    log_file = settings.BUILD_DIR / "server.log" if command else None
    triton = TritonServer(args.repository, server_settings, log_file=log_file)

    def on_sigterm(*_):
        # Only unwind here: stopping Triton inside the handler would deadlock with the Popen.wait() it
        # interrupted. The `finally` below does the stopping.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        triton.start()
    except ServerError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        triton.stop()
        return 130
    log.info("ready: HTTP %s  gRPC %s  metrics %s:%s", server_settings.http_url, server_settings.grpc_url,
             server_settings.host, server_settings.metrics_port)
    if not settings.SETTINGS.server.admin_key:
        key_file = settings.BUILD_DIR / "admin_key"
        key_file.write_text(triton.server.admin_key + "\n")
        key_file.chmod(0o600)
        log.info("model-repository API key (header %s) written to %s", s.admin_header, key_file)
    if command:
        env = {**os.environ, "TRITON_HOST": server_settings.host, "TRITON_HTTP_PORT": str(server_settings.http_port),
               "TRITON_GRPC_PORT": str(server_settings.grpc_port), "TRITON_METRICS_PORT": str(server_settings.metrics_port)}
        try:
            return subprocess.run(command, env=env).returncode
        except KeyboardInterrupt:
            return 130
        finally:
            triton.stop()
    log.info("Ctrl-C or SIGTERM stops it")
    stopped_by_us = False
    try:
        triton.process.wait()
    except KeyboardInterrupt:
        stopped_by_us = True
    finally:
        triton.stop()
    code = triton.process.returncode
    log.info("stopped (tritonserver exit status %s)", code)
    return 0 if stopped_by_us or code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
