"""bert-recsys bench loadtest: Locust headless against a deployment, then a summary, a plot and SLO checks.

    bert-recsys bench loadtest --host 127.0.0.1 --protocol grpc --users 8 --duration 30
    bert-recsys bench loadtest --step 2,10,16            # step load: +2 users every 10 s up to 16 (the knee)
    bert-recsys bench loadtest --slo-p99-ms 50 --slo-failure-rate 0.001

Writes into --out: locust_stats.csv (+ history), report.html (Locust's own), summary.json and
load.png (latency percentiles and throughput against users). Exits 1 when an SLO is violated.
Host and ports default to TRITON_HOST / TRITON_HTTP_PORT / TRITON_GRPC_PORT (see bert_recsys/settings.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bert_recsys import env, settings

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_command(args, out: Path) -> list[str]:
    s = settings.SETTINGS.server
    host = args.host or s.host
    if args.protocol == "gateway":
        target = args.gateway_url or f"http://127.0.0.1:{env.GATEWAY_PORT.get()}"
    elif args.protocol == "http":
        target = f"http://{host}:{args.http_port or s.http_port}"
    else:
        target = f"{host}:{args.grpc_port or s.grpc_port}"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", target,
               "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
               "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING"]
    if not args.step:
        command += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s"]
    return command


def read_summary(out: Path) -> dict:
    rows = list(csv.DictReader(open(out / "locust_stats.csv")))
    per_task = {}
    for row in rows:
        requests, failures = int(row["Request Count"]), int(row["Failure Count"])
        per_task[row["Name"]] = {
            "requests": requests, "failures": failures, "failure_rate": failures / requests if requests else 0.0,
            "rps": float(row["Requests/s"]), "p50_ms": float(row["50%"] or 0), "p95_ms": float(row["95%"] or 0),
            "p99_ms": float(row["99%"] or 0), "avg_ms": float(row["Average Response Time"] or 0),
        }
    failures = {}
    if (out / "locust_failures.csv").exists():
        for row in csv.DictReader(open(out / "locust_failures.csv")):
            failures[f"{row['Name']}: {row['Error'][:100]}"] = int(row["Occurrences"])
    return {"aggregated": per_task.get("Aggregated", {}), "tasks": {k: v for k, v in per_task.items() if k != "Aggregated"},
            "failure_kinds": failures}


def history_by_users(out: Path) -> list[dict]:
    """Per user count: median throughput and latency percentiles over that step (Aggregated rows)."""
    steps: dict[int, list[dict]] = {}
    for row in csv.DictReader(open(out / "locust_stats_history.csv")):
        if row["Name"] != "Aggregated" or row["50%"] in ("", "N/A") or float(row["Requests/s"]) == 0:
            continue
        steps.setdefault(int(row["User Count"]), []).append(row)
    table = []
    for users, rows in sorted(steps.items()):
        rows = rows[len(rows) // 3 :] or rows  # skip the ramp at the start of a step
        pick = lambda key: sorted(float(r[key]) for r in rows)[len(rows) // 2]  # noqa: E731
        table.append({"users": users, "rps": pick("Requests/s"), "p50_ms": pick("50%"), "p95_ms": pick("95%"),
                      "p99_ms": pick("99%"), "failures_per_s": pick("Failures/s")})
    return table


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [r["users"] for r in table]
    fig, latency = plt.subplots(figsize=(8, 4.5))
    for key, style in (("p50_ms", "-o"), ("p95_ms", "-s"), ("p99_ms", "-^")):
        latency.plot(users, [r[key] for r in table], style, label=key.replace("_ms", ""))
    latency.set_xlabel("concurrent users")
    latency.set_ylabel("latency (ms)")
    throughput = latency.twinx()
    throughput.plot(users, [r["rps"] for r in table], "k--", label="requests/s")
    throughput.set_ylabel("requests/s")
    lines = latency.get_legend_handles_labels()[0] + throughput.get_legend_handles_labels()[0]
    labels = latency.get_legend_handles_labels()[1] + throughput.get_legend_handles_labels()[1]
    latency.legend(lines, labels, loc="upper left")
    latency.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def knee(table: list[dict]) -> dict | None:
    """The last step where adding users still bought >= 10% more throughput."""
    best = None
    for previous, current in zip(table, table[1:]):
        if current["rps"] >= 1.10 * previous["rps"]:
            best = current
        else:
            break
    return best or (table[0] if table else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None)
    parser.add_argument("--http-port", type=int, default=None)
    parser.add_argument("--grpc-port", type=int, default=None)
    parser.add_argument("--protocol", choices=("http", "grpc", "gateway"), default="http",
                        help="gateway: drive the HTTP gateway (gateway/) at --gateway-url with LOADTEST_GATEWAY_KEY")
    parser.add_argument("--gateway-url", default=None,
                        help="the gateway's URL (default: http://127.0.0.1:GATEWAY_PORT)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--duration", type=int, default=30, help="seconds (ignored with --step)")
    parser.add_argument("--step", default="", help="USERS,SECONDS,MAX: step load to find the knee")
    parser.add_argument("--tasks", default="embed:6,score:3,recommend:1", help="task weights")
    parser.add_argument("--slo-p99-ms", type=float, default=None)
    parser.add_argument("--slo-failure-rate", type=float, default=None)
    parser.add_argument("--think-ms", type=float, default=0.0, help="each user's pause between calls")
    parser.add_argument("--canary-share", type=float, default=0.0,
                        help="share of embed/score calls sent to a canary version while a rollout runs one")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "loadtest")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    s = settings.SETTINGS.server
    env = {**os.environ, "LOADTEST_PROTOCOL": args.protocol, "LOADTEST_TASKS": args.tasks,
           "LOADTEST_GRPC_URL": f"{args.host or s.host}:{args.grpc_port or s.grpc_port}",
           "PYTHONPATH": str(settings.REPO_ROOT), "LOADTEST_CANARY_SHARE": str(args.canary_share),
           "LOADTEST_THINK_MS": str(args.think_ms)}
    if args.step:
        env["LOADTEST_STEP"] = args.step
    command = locust_command(args, args.out)
    print(f"[loadtest] {' '.join(command[3:])}", file=sys.stderr, flush=True)
    if args.step:
        users, seconds, top = (int(x) for x in args.step.split(","))
        planned = (top // users + 1) * seconds
    else:
        planned = args.duration
    locust = subprocess.Popen(command, env=env, cwd=settings.REPO_ROOT)
    # SIGTERM/SIGINT end the run early: Locust stops its users, writes its statistics, and we report them
    # (a rollout test runs the load until its rollouts are done).
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: locust.send_signal(signal.SIGTERM))
    try:
        locust.wait(timeout=planned + 180)
    except subprocess.TimeoutExpired:
        locust.kill()
        print("[loadtest] locust did not exit in time and was killed", file=sys.stderr)
    if not (args.out / "locust_stats.csv").exists():
        print("[loadtest] locust produced no statistics", file=sys.stderr)
        return 2
    summary = read_summary(args.out)
    table = history_by_users(args.out)
    summary.update(protocol=args.protocol, task_weights=args.tasks, by_users=table, knee=knee(table) if args.step else None)
    if table:
        plot(table, args.out / "load.png", f"Triton {args.protocol}: {args.tasks}")
    violations = []
    agg = summary["aggregated"]
    if args.slo_p99_ms is not None and agg.get("p99_ms", 0) > args.slo_p99_ms:
        violations.append(f"p99 {agg['p99_ms']:.0f} ms > {args.slo_p99_ms} ms")
    if args.slo_failure_rate is not None and agg.get("failure_rate", 0) > args.slo_failure_rate:
        violations.append(f"failure rate {agg['failure_rate']:.4f} > {args.slo_failure_rate}")
    summary["slo_violations"] = violations
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\n{'task':<12}{'requests':>9}{'failures':>9}{'rps':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}")
    for name, row in {**summary["tasks"], "all": agg}.items():
        print(f"{name:<12}{row['requests']:>9}{row['failures']:>9}{row['rps']:>8.1f}{row['p50_ms']:>8.0f}{row['p95_ms']:>8.0f}{row['p99_ms']:>8.0f}")
    for kind, count in summary["failure_kinds"].items():
        print(f"  failure x{count}: {kind}")
    if summary["knee"]:
        k = summary["knee"]
        print(f"knee: {k['users']} users, {k['rps']:.1f} req/s, p99 {k['p99_ms']:.0f} ms")
    print(f"written {args.out}/summary.json, report.html, load.png")
    for violation in violations:
        print(f"SLO violated: {violation}", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
