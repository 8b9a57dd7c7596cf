"""Rollout benchmark: consecutive rollouts on a live tritonserver under Locust load, on a timeline.

    bert-recsys bench rollout                       # or: make bench-rollout
    bert-recsys bench rollout --users 20 --variants onnx-fp32,onnx-int8,onnx-fp32

Starts its own server (onnx-int8, free loopback ports), runs Locust (HTTP, embed + score on real texts, with a
canary share) in the load-test venv, rolls each variant out in turn with `rollout.steps.run`, then stops
Locust. Writes build/reports/rollout.json (every rollout's report, Locust's totals) and rollout.png (throughput,
p50/p99 and failures per second, with each rollout's validate / canary / promote phases shaded). Exits 1 when
any request failed or a rollout did not promote.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bench.served import render, serve
from bert_recsys.rollout.policy import Outcome
from bert_recsys.rollout.steps import LiveRepository, RolloutSettings, TritonAdmin, run

def main(argv: list[str] | None = None) -> int:
    logs.configure()
    parser = argparse.ArgumentParser(prog="bert-recsys bench rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--think-ms", type=float, default=20.0)
    parser.add_argument("--canary-share", type=float, default=0.2)
    parser.add_argument("--variants", default="onnx-fp32,onnx-int8,onnx-fp32", help="rolled out in this order")
    parser.add_argument("--canary-seconds", type=float, default=15.0)
    parser.add_argument("--latency-max-ratio", type=float, default=4.0,
                        help="validation p50 ratio allowed (FP32 after INT8 is ~1.7x slower by design)")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports")
    args = parser.parse_args(argv)
    if not settings.LOADTEST_PYTHON.exists():
        raise SystemExit("the load-test venv is missing: make loadtest-venv")
    args.out.mkdir(parents=True, exist_ok=True)
    work = settings.BUILD_DIR / "rollout_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    s = settings.SETTINGS
    live_path = render("onnx-int8", work / "live", s)
    rollout = RolloutSettings(latency_max_ratio=args.latency_max_ratio, canary_seconds=args.canary_seconds,
                              canary_max_latency_ratio=args.latency_max_ratio, drain_seconds=3)
    reports = []
    with serve(live_path, work / "live.log", s, admin_key="rollout-bench") as triton:
        server = triton.server
        live = LiveRepository(live_path, replace(s, server=server))
        admin = TritonAdmin.single(server.grpc_url, f"127.0.0.1:{server.metrics_port}", server.admin_key)
        locust_out = work / "locust"
        locust = subprocess.Popen(
            [str(settings.LOADTEST_PYTHON), "-m", "loadtest.run", "--host", server.host, "--http-port", str(server.http_port),
             "--grpc-port", str(server.grpc_port), "--users", str(args.users), "--spawn-rate", str(args.users),
             "--duration", "3600", "--tasks", "embed:6,score:3,recommend:0", "--think-ms", str(args.think_ms),
             "--canary-share", str(args.canary_share), "--out", str(locust_out)],
            cwd=settings.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(15)  # users spawned, a baseline on the timeline
            for variant in args.variants.split(","):
                reports.append(run(live, admin, settings.EXPORT_DIR / variant, rollout))
            time.sleep(10)
        finally:
            locust.send_signal(signal.SIGTERM)
            locust_output, _ = locust.communicate(timeout=300)
    summary = json.loads((locust_out / "summary.json").read_text())
    history = [row for row in csv.DictReader(open(locust_out / "locust_stats_history.csv"))
               if row["Name"] == "Aggregated" and row["50%"] not in ("", "N/A")]
    agg = summary["aggregated"]
    result = {"users": args.users, "think_ms": args.think_ms, "canary_share": args.canary_share,
              "locust": {k: agg[k] for k in ("requests", "failures", "rps", "p50_ms", "p99_ms")},
              "failure_kinds": summary["failure_kinds"],
              "rollouts": [{k: r.get(k) for k in ("export", "stable", "new_version", "outcome", "seconds", "validation")}
                           | {"canary": r["canary"]} for r in reports]}
    (args.out / "rollout.json").write_text(json.dumps(result, indent=2))
    # Each report's phases with their start times (rollout.policy.Phase): what the plot shades.
    events = [(at, str(phase)) for report in reports for phase, at in report["phases"]]
    plot(history, events, args.out / "rollout.png", args)
    print(f"\n{'rollout':<32}{'outcome':>12}{'seconds':>9}{'canary req':>12}{'canary ms':>11}{'stable ms':>11}")
    for r in reports:
        c = r["canary"]
        print(f"v{r['stable']} -> v{r['new_version']} {Path(r['export']).name:<22}{r['outcome']:>12}{r['seconds']:>9.1f}"
              f"{c['canary']['requests']:>12}{c['canary']['mean_ms']:>11.1f}{c['stable']['mean_ms']:>11.1f}")
    print(f"Locust, {args.users} users through all of it: {agg['requests']} requests, {agg['failures']} failures, "
          f"{agg['rps']:.0f} req/s, p50 {agg['p50_ms']:.0f} ms, p99 {agg['p99_ms']:.0f} ms")
    print(f"written {args.out}/rollout.json, rollout.png")
    ok = agg["failures"] == 0 and all(r["outcome"] is Outcome.PROMOTED for r in reports)
    if not ok:
        print(locust_output[-3000:], file=sys.stderr)
    return 0 if ok else 1


def plot(history: list[dict], events: list[tuple[float, str]], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = int(history[0]["Timestamp"])
    seconds = [int(row["Timestamp"]) - t0 for row in history]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    top.plot(seconds, [float(row["Requests/s"]) for row in history], label="requests/s", color="tab:blue")
    top.plot(seconds, [float(row["Failures/s"]) for row in history], label="failures/s", color="tab:red")
    top.set_ylabel("per second")
    bottom.plot(seconds, [float(row["50%"]) for row in history], label="p50", color="tab:green")
    bottom.plot(seconds, [float(row["99%"]) for row in history], label="p99", color="tab:orange")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds")
    colours = {"validate": "#dddddd", "index": "#d6e4f5", "canary": "#fde9b0", "promote": "#c9e7c9", "roll_back": "#f4c7c3"}
    marks = []
    for when, phase in sorted(events):
        marks.append((when - t0, phase))
    for (start, phase), (end, _) in zip(marks, marks[1:]):
        if phase in colours:
            for axis in (top, bottom):
                axis.axvspan(start, end, color=colours[phase], zorder=0, label=phase if axis is top else None)
    handles, labels = top.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    top.legend(unique.values(), unique.keys(), fontsize=8, loc="lower left", ncol=5)
    bottom.legend(fontsize=8, loc="upper left")
    top.set_title(f"{len(args.variants.split(','))} rollouts under {args.users} Locust users "
                  f"(canary share {args.canary_share}): validate / canary / promote shaded")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
