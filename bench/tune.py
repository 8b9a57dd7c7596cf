"""bert-recsys tune (`make tune`): which variant serves fastest on *this* machine, measured, not assumed.

Which runtime and precision wins depends on the CPU (VNNI, AMX or AVX2 only): per-row INT8 gains ~1.3x over FP32
on an AVX2 EPYC and more where VNNI is. So every exported variant that passed its gate is served in turn by the
real tritonserver (embedded runtime: ONNX Runtime for onnx-*, OpenVINO for ov-*) and measured by perf_analyzer on `embed`: b1 p50 with a short text, and
sentences/s at b32 with 128-token texts. Every gated variant within 1.5x of the sequential winner (at most two,
closest first) is then served beside it (two servers up at once) and timed again in interleaved rounds by one
caller (b32 latency for throughput, b1 for latency; perf_analyzer's b32 row keeps 2 in flight), since one server's
window on a noisy machine can misrank two near ones. A contender replaces the winner only when it takes under
0.97x its time. The fastest by the objective (throughput by default) is written to
build/tune.json with the CPU model and ISA flags; `make serve`, `make demo` and the other targets use it unless
VARIANT= is given, and only on a machine with the same CPU model, flags and core count (the CPU changes between
machines: a choice made on another one is ignored, with a line on stderr).

    bert-recsys tune [--objective throughput|latency]
    bert-recsys tune --print-choice      # the tuned variant for this machine, or nothing
"""
from __future__ import annotations

import argparse
import json
import os
import time

from bert_recsys import settings
from bert_recsys.contracts.machine import machine_identity
from bert_recsys.server.choice import (OBJECTIVES, choose, contenders, passing_exports, print_choice, settle,
                                       tune_file)

TUNE_FILE = tune_file(settings.BUILD_DIR)


def measure(variant: str, seconds: float) -> dict:
    from transformers import AutoTokenizer

    from bert_recsys import logs
    from bench.perf import run_perf_analyzer
    from bench.serving import SHORT_TEXT, long_text
    from bench.served import serve_variant

    log = logs.get("loadtest")
    tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
    work = settings.BUILD_DIR / "tune"
    with serve_variant(variant, work, log_name=f"{variant}.log") as server:
        url = server.server.grpc_url
        b1 = run_perf_analyzer(url, "embed", 1, {"TEXT": {"content": [SHORT_TEXT], "shape": [1]}}, 1, seconds)
        b32 = run_perf_analyzer(url, "embed", 32, {"TEXT": {"content": [long_text(tokenizer, 128)], "shape": [1]}},
                                2, seconds)
    log.info("%s: b1 p50 %.2f ms, b32 %.0f sentences/s", variant, b1["p50_ms"], b32["infer_per_s"])
    return {"b1_p50_ms": b1["p50_ms"], "b32_seq_per_s": b32["infer_per_s"],
            "stable": bool(b1["stable"] and b32["stable"])}


def duel(best: str, contender: str, objective: str, rounds: int) -> dict:
    """`best` and `contender` served at once by two tritonservers, `embed` timed in blocks taken in turns (bench.timing's
    time_interleaved): b32 of 128-token texts for throughput, b1 of the short text for latency. One caller."""
    from contextlib import ExitStack
    from dataclasses import replace

    import numpy as np
    from transformers import AutoTokenizer

    from bert_recsys import logs
    from bert_recsys.client.triton import TritonClient
    from bench.serving import SHORT_TEXT, long_text
    from bench.served import serve_variant
    from bench.timing import time_interleaved

    log = logs.get("loadtest")
    if objective == "throughput":
        tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
        texts, per_round = [long_text(tokenizer, 128)] * 32, 3
    else:
        texts, per_round = [SHORT_TEXT], 30
    log.info("tune duel: %s against %s, %d rounds of %d calls each, interleaved", contender, best, rounds, per_round)
    with ExitStack() as stack:
        calls = {}
        for variant in (best, contender):
            server = stack.enter_context(serve_variant(variant, settings.BUILD_DIR / "tune" / f"duel-{variant}",
                                                       log_name=f"{variant}.log", admin_key="")).server
            client = stack.enter_context(TritonClient(server.grpc_url,
                                                      settings=replace(settings.SETTINGS, server=server)))
            calls[variant] = lambda client=client: client.embed(texts)
        times = time_interleaved(calls, rounds, per_round=per_round, skip=1)
    result = {"variant": contender, "best": best, "batch": len(texts), "rounds": rounds, "calls_each": len(times[best]),
              "best_ms": 1000 * float(np.median(times[best])), "variant_ms": 1000 * float(np.median(times[contender]))}
    log.info("tune duel: %s %.2f ms against %s %.2f ms at b%d", contender, result["variant_ms"], best,
             result["best_ms"], len(texts))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=OBJECTIVES, default="throughput")
    parser.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer measurement window")
    parser.add_argument("--duel-rounds", type=int, default=8,
                        help="interleaved rounds of each close contender against the sequential winner (0: none)")
    parser.add_argument("--print-choice", action="store_true", help="print the tuned variant for this machine")
    args = parser.parse_args(argv)
    if args.print_choice:
        return print_choice(settings.BUILD_DIR, settings.EXPORT_DIR)
    from bert_recsys import logs
    from bert_recsys.contracts.machine import machine

    logs.configure()
    log = logs.get("loadtest")
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
                     "spearman_ratio_confirmation": figures.spearman_ratio_confirmation,
                     "batch_invariance_min_cosine": figures.batch_invariance_min_cosine})
    best = choose(rows, args.objective)
    close = contenders(rows, best, args.objective)
    duels = []
    for row in close if args.duel_rounds > 0 else []:
        try:
            duels.append(duel(best["variant"], row["variant"], args.objective, args.duel_rounds))
        except Exception as error:  # noqa: BLE001 - a duel that cannot run leaves the sequential figures standing
            log.warning("tune duel of %s against %s failed: %s", row["variant"], best["variant"], error)
            duels.append({"variant": row["variant"], "best": best["variant"], "error": str(error)[:300]})
    chosen, why = settle(best["variant"], duels, close=len(close))
    record = {"machine": machine_identity(), "machine_line": machine(), "objective": args.objective,
              "variant": chosen, "why": why, "sequential_best": best["variant"], "duels": duels, "rows": rows,
              "not_served": skipped,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    TUNE_FILE.parent.mkdir(parents=True, exist_ok=True)
    partial = TUNE_FILE.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2))
    os.replace(partial, TUNE_FILE)
    print(f"\n{machine()}; objective {args.objective}; perf_analyzer over gRPC, `embed`")
    width = max([len("variant"), *(len(row["variant"]) for row in rows + skipped)]) + 2
    print(f"{'variant':<{width}}{'b1 p50 ms':>11}{'b32 sent/s':>12}{'Spearman conf.':>16}{'invariance':>12}")
    for row in rows:
        mark = "  <- chosen" if row["variant"] == chosen else ""
        print(f"{row['variant']:<{width}}{row['b1_p50_ms']:>11.2f}{row['b32_seq_per_s']:>12.1f}"
              f"{row['spearman_ratio_confirmation'] or float('nan'):>16.5f}{row['batch_invariance_min_cosine']:>12.6f}"
              f"{mark}{'' if row['stable'] else '  (unstable)'}")
    for row in skipped:
        print(f"{row['variant']:<{width}}{row['status']}: {row['detail']}")
    for result in duels:
        if "error" in result:
            print(f"interleaved: {result['variant']} against {result['best']} not run: {result['error']}")
            continue
        print(f"interleaved, b{result['batch']}, {result['rounds']} rounds: {result['variant']} {result['variant_ms']:.2f} ms "
              f"against {result['best']} {result['best_ms']:.2f} ms ({result['variant_ms'] / result['best_ms']:.3f}x)")
    print(f"chosen {why}")
    print(f"written {TUNE_FILE}: make serve / make demo now serve {chosen} on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
