"""python -m loadtest.tune (`make tune`): which variant serves fastest on *this* machine, measured, not assumed.

Which runtime and precision wins depends on the CPU (VNNI, AMX or AVX2 only): per-row INT8 gains ~1.3x over FP32
on an AVX2 EPYC and more where VNNI is. So every exported variant that passed its gate is served in turn by the
real tritonserver (embedded runtime: ONNX Runtime for onnx-*, OpenVINO for ov-*) and measured by perf_analyzer on `embed`: b1 p50 with a short text, and
sentences/s at b32 with 128-token texts. The fastest by the objective (throughput by default) is written to
build/tune.json with the CPU model and ISA flags; `make serve`, `make demo` and the other targets use it unless
VARIANT= is given, and only on a machine with the same CPU model, flags and core count (the CPU changes between
machines: a choice made on another one is ignored, with a line on stderr).

    python -m loadtest.tune [--objective throughput|latency]
    python -m loadtest.tune --print-choice      # the tuned variant for this machine, or nothing
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from bert_recsys import settings
from bert_recsys.export.bench import machine_identity

TUNE_FILE = settings.BUILD_DIR / "tune.json"
OBJECTIVES = ("throughput", "latency")


def choose(rows: list[dict], objective: str = "throughput") -> dict:
    """The fastest row among those whose variant passed its gate. rows: {variant, gate_passed, b1_p50_ms,
    b32_seq_per_s}. Throughput: most b32 sentences/s (b1 p50 breaks ties); latency: lowest b1 p50."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose from {', '.join(OBJECTIVES)}")
    passing = [row for row in rows if row["gate_passed"]]
    if not passing:
        raise ValueError("no measured variant passed its gate: nothing to choose")
    if objective == "throughput":
        return max(passing, key=lambda row: (row["b32_seq_per_s"], -row["b1_p50_ms"]))
    return min(passing, key=lambda row: (row["b1_p50_ms"], -row["b32_seq_per_s"]))


def tuned_variant(record: dict | None, machine: dict, exported: set[str]) -> tuple[str | None, str]:
    """(variant to serve, why): the record's choice only for the machine it was measured on, and only while that
    variant is still exported and gated."""
    if record is None:
        return None, "not tuned here yet (make tune)"
    if record.get("machine") != machine:
        return None, (f"tuned on {record.get('machine', {}).get('cpu', 'another machine')} "
                      f"{record.get('machine', {}).get('flags')}, this is {machine['cpu']} {machine['flags']}: run make tune")
    variant = record.get("variant")
    if variant not in exported:
        return None, f"the tuned variant {variant} is no longer exported and gated: run make tune"
    return variant, f"tuned {record.get('measured_at', '')}: {variant} ({record.get('objective')})"


def passing_exports(export_dir: Path) -> dict[str, object]:
    """{variant: manifest} of the variants in export_dir that passed their gate and the embedded runtime serves
    (ONNX in ONNX Runtime, OpenVINO IR in OpenVINO)."""
    from bert_recsys.contracts.manifest import Manifest, ManifestError
    from bert_recsys.contracts.runtime import Runtime
    from bert_recsys.model_repository.render import RUNTIME_FORMATS

    found = {}
    for directory in sorted(Path(export_dir).iterdir()) if Path(export_dir).is_dir() else []:
        try:
            manifest = Manifest.read(directory)
        except ManifestError:
            continue
        if manifest.format in RUNTIME_FORMATS[Runtime.EMBEDDED] and manifest.gate.passed:
            found[manifest.variant] = manifest
    return found


def print_choice() -> int:
    record = json.loads(TUNE_FILE.read_text()) if TUNE_FILE.exists() else None
    variant, why = tuned_variant(record, machine_identity(), set(passing_exports(settings.EXPORT_DIR)))
    if record is not None:  # silent until someone tuned: then say which choice is used, or why not
        print(f"tune: {why}", file=sys.stderr)
    if variant:
        print(variant)
    return 0


def measure(variant: str, seconds: float) -> dict:
    from transformers import AutoTokenizer

    from bert_recsys import logs
    from loadtest.perf import run_perf_analyzer
    from loadtest.serving_bench import SHORT_TEXT, long_text
    from bert_recsys.model_repository.render import build_repository
    from bert_recsys.server.launcher import TritonServer, free_port

    log = logs.get("loadtest")
    tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
    work = settings.BUILD_DIR / "tune"
    repo = build_repository(settings.SETTINGS, settings.EXPORT_DIR, variant, "embedded", work / "repository")
    server_settings = replace(settings.SETTINGS.server, http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port())
    with TritonServer(repo, server_settings, log_file=work / f"{variant}.log") as server:
        url = server.server.grpc_url
        b1 = run_perf_analyzer(url, "embed", 1, {"TEXT": {"content": [SHORT_TEXT], "shape": [1]}}, 1, seconds)
        b32 = run_perf_analyzer(url, "embed", 32, {"TEXT": {"content": [long_text(tokenizer, 128)], "shape": [1]}},
                                2, seconds)
    log.info("%s: b1 p50 %.2f ms, b32 %.0f sentences/s", variant, b1["p50_ms"], b32["infer_per_s"])
    return {"b1_p50_ms": b1["p50_ms"], "b32_seq_per_s": b32["infer_per_s"],
            "stable": bool(b1["stable"] and b32["stable"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=OBJECTIVES, default="throughput")
    parser.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer measurement window")
    parser.add_argument("--print-choice", action="store_true", help="print the tuned variant for this machine")
    args = parser.parse_args(argv)
    if args.print_choice:
        return print_choice()
    from bert_recsys import logs
    from bert_recsys.export.bench import machine

    logs.configure()
    from bert_recsys.export.pipeline import not_served, read_outcomes
    from bert_recsys.export.variants import CPU_VARIANTS

    candidates = passing_exports(settings.EXPORT_DIR)
    try:
        skipped = not_served(read_outcomes(settings.EXPORT_DIR), set(candidates), CPU_VARIANTS, machine_identity())
    except ValueError as error:
        raise SystemExit(f"tune: {error}") from None
    if not candidates:
        raise SystemExit(f"no gated variant under {settings.EXPORT_DIR}: run make export first")
    rows = []
    for variant, manifest in candidates.items():
        figures = manifest.gate.figures
        rows.append({"variant": variant, "gate_passed": True, **measure(variant, args.seconds),
                     "spearman_ratio_confirmation": figures.get("spearman_ratio_confirmation"),
                     "batch_invariance_min_cosine": figures.get("batch_invariance_min_cosine")})
    best = choose(rows, args.objective)
    record = {"machine": machine_identity(), "machine_line": machine(), "objective": args.objective,
              "variant": best["variant"], "rows": rows, "not_served": skipped,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    TUNE_FILE.parent.mkdir(parents=True, exist_ok=True)
    partial = TUNE_FILE.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2))
    os.replace(partial, TUNE_FILE)
    print(f"\n{machine()}; objective {args.objective}; perf_analyzer over gRPC, `embed`")
    print(f"{'variant':<12}{'b1 p50 ms':>11}{'b32 sent/s':>12}{'Spearman conf.':>16}{'invariance':>12}")
    for row in rows:
        mark = "  <- chosen" if row is best else ""
        print(f"{row['variant']:<12}{row['b1_p50_ms']:>11.2f}{row['b32_seq_per_s']:>12.1f}"
              f"{row['spearman_ratio_confirmation'] or float('nan'):>16.5f}{row['batch_invariance_min_cosine']:>12.6f}"
              f"{mark}{'' if row['stable'] else '  (unstable)'}")
    for row in skipped:
        print(f"{row['variant']:<12}{row['status']}: {row['detail']}")
    print(f"written {TUNE_FILE}: make serve / make demo now serve {best['variant']} on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
