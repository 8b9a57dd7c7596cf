"""bert-recsys bench export: the bare encoder, PyTorch FP32 against every exported ONNX variant.

One run, one table: p50 latency at batch 1 x 16 tokens and batch 32 x 128 tokens, throughput at b32/s128,
and each figure as a ratio to PyTorch FP32. All threads of the machine are used by every runtime.
Writes build/reports/export_bench.json for the benchmark report.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.contracts.machine import machine, machine_identity
from bert_recsys.contracts.manifest import Manifest
from bench.timing import time_calls
from bert_recsys.export.variants import CPU_VARIANTS

log = logs.get("export")

SHAPES = {"b1/s16": (1, 16), "b32/s128": (32, 128)}


def time_runner(runner, batch: int, seq: int, budget_s: float, max_runs: int) -> list[float]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 29000, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    return time_calls(lambda: runner(ids, mask), budget_s, max_runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench export", description=__doc__)
    parser.add_argument("--export-dir", type=Path, default=settings.EXPORT_DIR)
    parser.add_argument("--variants", default=",".join((*CPU_VARIANTS, "torch-fp32")))
    parser.add_argument("--also", type=Path, action="append", default=[], metavar="DIR",
                        help="measure the gated variants of another export folder too, in the same run (e.g. a "
                             "distilled student's build/export-student); its rows are named DIR/variant")
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per runner and shape")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "export_bench.json")
    args = parser.parse_args(argv)
    logs.configure()

    import torch

    from bert_recsys.export.onnx_export import load_torch_encoder
    from bert_recsys.export.runners import TorchRunner, runner_for  # here, so machine() imports without onnx or torch
    from bert_recsys.export.source import load_source

    torch.set_num_threads(os.cpu_count())
    source = load_source(settings.default_model_dir())
    from bert_recsys.export.pipeline import not_served, read_outcomes

    runners = [TorchRunner(load_torch_encoder(source, attn_implementation="sdpa"), name="pytorch-fp32")]
    wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
    present = {variant for variant in wanted if Manifest.exists(args.export_dir / variant)}
    try:
        not_measured = not_served(read_outcomes(args.export_dir), present, wanted, machine_identity())
    except ValueError as error:
        raise SystemExit(f"bench: {error}") from None
    for row in not_measured:
        log.warning("not measuring %s: %s, %s", row["variant"], row["status"], row["detail"])
    for variant in wanted:
        if variant in present:
            runners.append(runner_for(args.export_dir / variant, Manifest.read(args.export_dir / variant), name=variant))
    for folder in args.also:
        for variant in wanted:
            if Manifest.exists(folder / variant):
                runners.append(runner_for(folder / variant, Manifest.read(folder / variant), name=f"{folder.name}/{variant}"))

    rows = []
    for runner in runners:
        row = {"runtime": runner.name}
        for label, (batch, seq) in SHAPES.items():
            times = time_runner(runner, batch, seq, args.seconds, max_runs=2000)
            row[label] = {"p50_ms": 1000 * float(np.median(times)), "p90_ms": 1000 * float(np.percentile(times, 90)),
                          "runs": len(times), "seq_per_s": batch / float(np.median(times))}
        rows.append(row)
        log.info("measured %s", runner.name)

    base = rows[0]
    print(f"\nBare encoder, {source.path.name} ({source.num_layers} layers, dim {source.dim}); {machine()}")
    print(f"{'runtime':<30}{'b1/s16 p50 ms':>15}{'vs torch':>10}{'b32/s128 p50 ms':>17}{'seq/s':>9}{'vs torch':>10}")
    for row in rows:
        small, large = row["b1/s16"], row["b32/s128"]
        print(f"{row['runtime']:<30}{small['p50_ms']:>15.2f}{base['b1/s16']['p50_ms'] / small['p50_ms']:>9.2f}x"
              f"{large['p50_ms']:>17.1f}{large['seq_per_s']:>9.0f}{large['seq_per_s'] / base['b32/s128']['seq_per_s']:>9.2f}x")
    for row in not_measured:
        print(f"{row['variant']:<30}not measured, {row['status']}: {row['detail']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows, "not_measured": not_measured}, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
