"""bert-recsys serve: serve build/model_repository until Ctrl-C / SIGTERM.

    bert-recsys serve                                  # serve until stopped
    bert-recsys serve --free-ports -- CMD ARGS...      # serve while CMD runs, then stop; CMD sees the
                                                      # server through TRITON_HOST / TRITON_*_PORT

Binds to loopback by default. Settings come from settings.ServerSettings (TRITON_HOST, TRITON_HTTP_PORT,
TRITON_GRPC_PORT, TRITON_METRICS_PORT, TRITON_ADMIN_KEY); flags override them.

A tritonserver that dies while serving is reaped and started again on the same ports with the same admin key,
after a backoff (server/restart.py); more than --max-restarts crashes within --restart-window seconds is a crash
loop: the launcher says so and exits 1.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.server.launcher import ServerError, TritonServer, free_port
from bert_recsys.server.restart import RestartPolicy, restart_delay

log = logs.get("server")


def main(argv: list[str] | None = None) -> int:
    # The project's one log format (bert_recsys/logs.py): the launcher, the reaper and the supervisor log through "server".
    logs.configure()
    s = settings.SETTINGS.server
    parser = argparse.ArgumentParser(prog="bert-recsys serve", description=__doc__)
    parser.add_argument("--repository", type=Path, default=settings.MODEL_REPOSITORY_DIR)
    parser.add_argument("--host", default=s.host, help="bind address (default: %(default)s; never expose admin APIs publicly)")
    parser.add_argument("--http-port", type=int, default=s.http_port)
    parser.add_argument("--grpc-port", type=int, default=s.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=s.metrics_port)
    parser.add_argument("--free-ports", action="store_true", help="pick unused ports instead of the defaults")
    parser.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts,
                        help="restarts of a dead tritonserver allowed within --restart-window (0: none; default %(default)s)")
    parser.add_argument("--restart-window", type=float, default=RestartPolicy.window_s, metavar="SECONDS",
                        help="more crashes than --max-restarts within this many seconds is a crash loop (default %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...: run CMD against the server, then stop")
    args = parser.parse_args(argv)
    try:
        policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
    except ValueError as error:
        parser.error(str(error))
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
    return serve(triton, policy, log_file)


def serve(triton: TritonServer, policy: RestartPolicy, log_file: Path | None) -> int:
    """Serve until SIGTERM / Ctrl-C (exit 0); restart a tritonserver that exits without being asked to (whatever
    its exit status: a server only this launcher may stop), until a crash loop (exit 1)."""
    crashes: list[float] = []
    try:
        while True:
            triton.process.wait()
            code = triton.process.returncode
            triton.stop()  # reaps what the dead server left: its stubs and shared memory
            now = time.monotonic()
            crashes.append(now)
            delay = restart_delay(policy, crashes, now)
            recent = sum(now - t <= policy.window_s for t in crashes)
            if delay is None:
                log.error("tritonserver died (exit status %s) %d times within %.0f s: a crash loop, giving up%s",
                          code, recent, policy.window_s, f"; see {log_file}" if log_file else "")
                return 1
            log.warning("tritonserver died (exit status %s): restarting it in %.1f s (restart %d of %d allowed "
                        "within %.0f s)", code, delay, recent, policy.max_restarts, policy.window_s)
            time.sleep(delay)
            # The same ports and admin key: clients, the gateway and `bert-recsys rollout` find it where it was.
            triton = TritonServer(triton.repository, triton.server, log_file=log_file)
            try:
                triton.start()
            except (ServerError, OSError) as error:
                log.error("restart failed: %s", error)
                if triton.process is None:  # it never ran (the repository or the binary is gone): nothing to retry
                    return 1
                continue  # it ran and died during start-up: one more crash, decided above
            log.info("tritonserver is back: HTTP %s  gRPC %s", triton.server.http_url, triton.server.grpc_url)
    except KeyboardInterrupt:
        triton.stop()
        log.info("stopped (tritonserver exit status %s)", triton.process.returncode if triton.process else None)
        return 0


if __name__ == "__main__":
    sys.exit(main())
