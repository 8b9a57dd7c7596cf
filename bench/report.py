"""bert-recsys bench report (`make report`): every benchmark in one run, one markdown report with plots.

Runs, in order, on this machine:
1. the bare encoder by variant (bench.export), and the most INT8 can give on this CPU (bench.ceiling);
2. `embed` and the bare `encoder` through Triton at b1 and b32, via perf_analyzer (bench.serving),
   which also gives the ensemble overhead;
3. a step load on `embed` over HTTP to find the knee (Locust);
4. the mixed workload, including the full recommend path, over gRPC (Locust).
Writes build/reports/REPORT.md beside its PNG plots.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bert_recsys import settings

REPORTS = settings.BUILD_DIR / "reports"


def step(title: str, command: list[str]) -> None:
    print(f"[report] {title}: {' '.join(command[1:6])} ...", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=settings.REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"[report] {title} failed (exit {result.returncode})")
    print(f"[report] {title}: {time.perf_counter() - started:.0f} s", flush=True)


def served(command: list[str]) -> list[str]:
    """Run a load-test command against a fresh local tritonserver on free ports."""
    return [sys.executable, "-m", "bert_recsys.server", "--free-ports", "--", str(settings.LOADTEST_PYTHON), "-m", "loadtest.run", *command]


def bar_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["runtime"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [r["b1/s16"]["p50_ms"] for r in rows], color="tab:blue")
    axes[0].set_title("b1/s16 p50 latency (ms, lower is better)")
    axes[1].bar(names, [r["b32/s128"]["seq_per_s"] for r in rows], color="tab:green")
    axes[1].set_title("b32/s128 throughput (seq/s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ceiling_section(path: Path) -> list[str]:
    """What INT8 can give at most on this CPU (bench.ceiling), or why it is not in the report."""
    if not path.exists():
        return ["Not measured: the INT8 ceiling (`bert-recsys bench ceiling`).", ""]
    report = json.loads(path.read_text())
    c = report["ceiling"]
    lines = ["## What INT8 can give at most on this CPU (`bert-recsys bench ceiling`)", "",
             f"b{report['batch']}/s{report['seq']}: every weight GEMM of the FP32 graph timed in FP32 and in INT8 "
             f"(MatMulInteger, no quantization cost), the rest of the graph as it is.", "",
             "| | ms | vs PyTorch |", "|---|---|---|"]
    rows = [("PyTorch FP32", c["reference_ms"]), ("ONNX Runtime FP32", c["fp32_ms"]),
            (f"INT8 ceiling (GEMMs {c['gemm_speedup']:.2f}x faster)", c["int8_ideal_ms"])]
    if "int8" in report["end_to_end_ms"]:
        rows.append(("INT8 variant measured", report["end_to_end_ms"]["int8"]))
    for label, ms in rows:
        lines.append(f"| {label} | {ms:.1f} | {c['reference_ms'] / ms:.2f}x |")
    return lines + ["", "![INT8 ceiling](int8_ceiling.png)", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench report", description=__doc__)
    parser.add_argument("--variant", default="onnx-int8")
    parser.add_argument("--step", default="2,12,16", help="knee search: USERS,SECONDS,MAX")
    parser.add_argument("--mixed-users", type=int, default=4)
    parser.add_argument("--mixed-seconds", type=int, default=30)
    parser.add_argument("--render-only", action="store_true", help="write REPORT.md from the last run's results")
    args = parser.parse_args(argv)
    REPORTS.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        measure(args)
    return render(args)


def measure(args) -> None:
    py = sys.executable
    step("bare encoder by variant", [py, "-m", "bench.export"])
    step("INT8 ceiling on this CPU", [py, "-m", "bench.ceiling"])
    step("Triton vs bare encoder (perf_analyzer)", [py, "-m", "bench.serving", "--variant", args.variant])
    step("model repository", [py, "-m", "bert_recsys.model_repository", "build", "--variant", args.variant])
    step("knee (step load, embed over HTTP)", served(["--protocol", "http", "--tasks", "embed:1", "--step", args.step,
                                                      "--out", str(REPORTS / "knee")]))
    step("mixed workload with the recommend path (gRPC)", served([
        "--protocol", "grpc", "--users", str(args.mixed_users), "--duration", str(args.mixed_seconds),
        "--out", str(REPORTS / "mixed")]))


def render(args) -> int:
    export = json.loads((REPORTS / "export_bench.json").read_text())
    serving = json.loads((REPORTS / "serving_bench.json").read_text())
    knee = json.loads((REPORTS / "knee" / "summary.json").read_text())
    mixed = json.loads((REPORTS / "mixed" / "summary.json").read_text())
    bar_plot(export["rows"], REPORTS / "encoder.png")

    base = export["rows"][0]
    lines = [
        "# Benchmark report", "",
        f"Measured in one run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {export['machine']}. Absolute figures hold for this machine only; ratios travel better.", "",
        "## Bare encoder by variant", "",
        "| runtime | b1/s16 p50 ms | vs PyTorch | b32/s128 p50 ms | seq/s | vs PyTorch |", "|---|---|---|---|---|---|",
    ]
    for r in export["rows"]:
        lines.append(f"| {r['runtime']} | {r['b1/s16']['p50_ms']:.2f} | {base['b1/s16']['p50_ms'] / r['b1/s16']['p50_ms']:.2f}x | "
                     f"{r['b32/s128']['p50_ms']:.1f} | {r['b32/s128']['seq_per_s']:.0f} | "
                     f"{r['b32/s128']['seq_per_s'] / base['b32/s128']['seq_per_s']:.2f}x |")
    lines += ["", "![bare encoder](encoder.png)", "", *ceiling_section(REPORTS / "int8_ceiling.json"),
              f"## `embed` through Triton ({serving['variant']}, perf_analyzer over gRPC, concurrency 1)", "",
              "| path | p50 ms | seq/s |", "|---|---|---|"]
    for name, row in serving["rows"].items():
        lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['infer_per_s']:.0f} |")
    lines += ["", f"Ensemble overhead at b1 (tokenization, the Python-backend hops, gRPC): "
                  f"**{serving['b1_overhead_ms']:.2f} ms** over the bare encoder. At b32/s128 `embed` delivers "
                  f"**{100 * serving['b32_throughput_ratio']:.1f}%** of the bare encoder's throughput.", "",
              "## The knee (Locust step load, `embed` over HTTP)", "",
              "| users | req/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    for r in knee["by_users"]:
        lines.append(f"| {r['users']} | {r['rps']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |")
    if knee.get("knee"):
        k = knee["knee"]
        lines += ["", f"Knee: **{k['users']} users, {k['rps']:.0f} req/s**: beyond it, added users buy latency, not "
                      "throughput. (On 2 cores Locust itself competes with Triton for CPU.)"]
    lines += ["", "![knee](knee/load.png)", "",
              f"## Mixed workload with the full recommend path ({mixed['protocol']}, {args.mixed_users} users, "
              f"{args.mixed_seconds} s; weights {mixed['task_weights']})", "",
              "| task | requests | failures | req/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for name, r in {**mixed["tasks"], "all": mixed["aggregated"]}.items():
        lines.append(f"| {name} | {r['requests']} | {r['failures']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} |")
    lines += ["", "`recommend` = profile, four recall channels, one `score` ensemble call, MMR assembly.", "",
              "## GPU (`make bench-gpu`, torch runtime)", ""]
    gpu = REPORTS / "gpu" / "gpu_bench.json"
    if gpu.exists():
        from bench.gpu import markdown

        image = "gpu/gpu_bench.png" if (REPORTS / "gpu" / "gpu_bench.png").exists() else None
        lines += ["From its own run (a GPU machine, not this one's):", "", *markdown(json.loads(gpu.read_text()), image)]
    else:
        lines += ["Not measured: no build/reports/gpu/gpu_bench.json. `make bench-gpu` on a GPU machine writes it "
                  "(docs/gpu.md).", ""]
    (REPORTS / "REPORT.md").write_text("\n".join(lines))
    print(f"[report] written {REPORTS / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
