"""bert-recsys bench ceiling: the most INT8 can speed an exported encoder up on this CPU, measured.

Quantization speeds up the weight GEMMs alone (the attention's QKV and output projections, the FFN). Layer
norms, GELU, and the attention's softmax and score/context products cost what they cost in FP32. On the
machine at hand this measures:

  1. every weight GEMM of the variant's FP32 ONNX graph at batch x seq rows, in FP32 (ONNX Runtime MatMul) and
     in INT8 (MatMulInteger, u8 activations x s8 weights: the QGEMM kernel the INT8 variants run, also behind
     MatMulIntegerToFloat). The INT8 GEMM gets its input already quantized, so quantizing costs nothing here;
  2. the FP32 graph end to end. What is not GEMM = end to end - its GEMMs;
  3. the reference: PyTorch FP32 (SDPA) of the teacher, the baseline the speed goals are set against.

The ceiling is reference / (not-GEMM + INT8 GEMMs): every GEMM in INT8 at no quantization cost. The exported
INT8 variant's measured ratio is printed next to it, with its time by operator type (ONNX Runtime's profiler). A real INT8 variant lands below the ceiling: it pays for
quantizing activations, and a gated recipe keeps some GEMMs in FP32. A goal above the ceiling cannot be met on
this CPU by quantizing this model; it needs a CPU with faster INT8 (VNNI, AMX) or a smaller model.

Writes build/reports/int8_ceiling.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.contracts.manifest import Manifest, Precision, VariantFormat
from bert_recsys.contracts.machine import machine
from bench.timing import time_interleaved

log = logs.get("export")

# Ops whose second input, when it is a constant, is a weight matrix [K, N] that INT8 would quantize. The fused
# Attention's weight is the QKV projection [hidden, 3 * hidden].
GEMM_OPS = ("MatMul", "Gemm", "Attention")


@dataclass(frozen=True)
class Gemm:
    k: int
    n: int
    count: int  # how many nodes of the graph have this shape

    def label(self) -> str:
        return f"{self.k}x{self.n}"


@dataclass(frozen=True)
class GemmTiming:
    gemm: Gemm
    fp32_ms: float  # one node, median
    int8_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms


@dataclass(frozen=True)
class Ceiling:
    reference_ms: float  # PyTorch FP32 of the teacher, end to end
    fp32_ms: float       # the variant's FP32 ONNX graph, end to end
    gemm_fp32_ms: float  # its weight GEMMs, summed over nodes, FP32
    gemm_int8_ms: float  # the same GEMMs in INT8, no quantization cost

    @property
    def rest_ms(self) -> float:
        """What quantization cannot touch. Never below 0: the GEMMs timed alone can exceed their share."""
        return max(self.fp32_ms - self.gemm_fp32_ms, 0.0)

    @property
    def int8_ideal_ms(self) -> float:
        return self.rest_ms + self.gemm_int8_ms

    @property
    def ratio(self) -> float:
        """The best speed-up over the reference that INT8 can give this graph on this CPU."""
        return self.reference_ms / self.int8_ideal_ms

    @property
    def gemm_speedup(self) -> float:
        return self.gemm_fp32_ms / self.gemm_int8_ms


def weight_gemms(model) -> list[Gemm]:
    """The weight GEMM shapes of an ONNX graph, each with its node count, in first-seen order.

    A MatMul or Gemm counts when its second input is an initializer (a Gemm with transB=1 stores [N, K]); a
    fused Attention counts for its QKV projection. Activation x activation products (attention scores) do not."""
    from onnx import helper

    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.op_type not in GEMM_OPS or len(node.input) < 2 or len(shapes.get(node.input[1], ())) != 2:
            continue
        k, n = shapes[node.input[1]]
        if node.op_type == "Gemm" and any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute):
            k, n = n, k
        counts[(int(k), int(n))] += 1
    return [Gemm(k, n, count) for (k, n), count in counts.items()]


def gemm_model(k: int, n: int, int8: bool):
    """One-node graph: x [rows, k] @ w [k, n]; INT8 = MatMulInteger(u8 x, s8 w, x zero point 128) -> int32."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    if int8:
        inits = [numpy_helper.from_array(np.clip(np.round(weight / 0.002), -127, 127).astype(np.int8), "w"),
                 numpy_helper.from_array(np.array(128, np.uint8), "x_zero_point")]
        node = helper.make_node("MatMulInteger", ["x", "w", "x_zero_point"], ["y"])
        x_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        inits = [numpy_helper.from_array(weight, "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], f"gemm_{k}x{n}", [helper.make_tensor_value_info("x", x_type, ["rows", k])],
                              [helper.make_tensor_value_info("y", y_type, ["rows", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def time_gemm(gemm: Gemm, rows: int, rounds: int) -> GemmTiming:
    """FP32 and INT8 medians of one GEMM, measured in turns, with all of the machine's threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    rng = np.random.default_rng(1)
    calls = {}
    for int8 in (False, True):
        session = ort.InferenceSession(gemm_model(gemm.k, gemm.n, int8).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        x = (rng.integers(1, 256, (rows, gemm.k)).astype(np.uint8) if int8
             else rng.standard_normal((rows, gemm.k)).astype(np.float32))
        calls[int8] = lambda session=session, x=x: session.run(None, {"x": x})
    times = time_interleaved(calls, rounds, per_round=8, skip=2)
    return GemmTiming(gemm, fp32_ms=1000 * float(np.median(times[False])), int8_ms=1000 * float(np.median(times[True])))


def ceiling(reference_ms: float, fp32_ms: float, timings: list[GemmTiming]) -> Ceiling:
    return Ceiling(reference_ms=reference_ms, fp32_ms=fp32_ms,
                   gemm_fp32_ms=sum(t.fp32_ms * t.gemm.count for t in timings),
                   gemm_int8_ms=sum(t.int8_ms * t.gemm.count for t in timings))


def op_times(events: list[dict]) -> dict[str, float]:
    """ms per run by operator type from an ONNX Runtime profile, most first. The first run is a warm-up and is
    left out; a node counts in the run whose span holds its start."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    if len(runs) < 2:
        raise ValueError(f"the profile has {len(runs)} model runs; a warm-up and at least one more are needed")
    counted = runs[1:]
    totals: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in counted):
            totals[e["args"]["op_name"]] += e["dur"] / 1000 / len(counted)
    return dict(totals.most_common())


def profile_ops(path: Path, feeds: dict[str, np.ndarray], runs: int = 3) -> dict[str, float]:
    """Where a graph's time goes, by operator type (ms per run), from a profiled session of its own."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feeds)
        return op_times(json.loads(Path(session.end_profiling()).read_text()))


def goal_verdict(result: Ceiling, goal: float) -> str:
    if result.ratio >= goal:
        return f"a {goal:g}x goal is within the ceiling ({result.ratio:.2f}x) on this CPU"
    return (f"a {goal:g}x goal is out of reach by quantization on this CPU: the ceiling is {result.ratio:.2f}x "
            f"(INT8 GEMMs {result.gemm_speedup:.2f}x faster than FP32 here; {result.rest_ms:.0f} ms of "
            f"{result.fp32_ms:.0f} ms is not GEMM)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, default=settings.EXPORT_DIR,
                        help="its onnx-fp32 is the graph measured; a student's export directory works too")
    parser.add_argument("--fp32-variant", default="onnx-fp32")
    parser.add_argument("--int8-variant", default="onnx-int8", help="measured next to the ceiling when exported")
    parser.add_argument("--reference-model", type=Path, default=None,
                        help="PyTorch FP32 baseline (default: the teacher, as in `bert-recsys bench export`)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds of measurement: in each, every graph runs a block in turn (then every GEMM, "
                             "in FP32 and INT8, half as many rounds)")
    parser.add_argument("--goal", type=float, default=None, help="a speed-up over the reference to check")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "int8_ceiling.json")
    args = parser.parse_args(argv)
    logs.configure()

    import onnx
    import torch

    from bert_recsys.export.onnx_export import load_torch_encoder
    from bert_recsys.export.runners import OrtRunner, TorchRunner
    from bert_recsys.export.source import load_source

    fp32_dir = args.export_dir / args.fp32_variant
    if not Manifest.exists(fp32_dir):
        parser.error(f"{fp32_dir} has no manifest: export it first (bert-recsys export --variants {args.fp32_variant})")
    manifest = Manifest.read(fp32_dir)
    if manifest.format != VariantFormat.ONNX or manifest.precision != Precision.FP32:
        parser.error(f"{fp32_dir} is {manifest.format.value} {manifest.precision.value}; an FP32 ONNX graph is needed")
    graph_path = fp32_dir / manifest.artifact.file
    gemms = weight_gemms(onnx.load(str(graph_path), load_external_data=False))
    if not gemms:
        parser.error(f"{graph_path} has no weight GEMM (MatMul, Gemm or Attention with a constant weight)")
    rows = args.batch * args.seq

    torch.set_num_threads(os.cpu_count())
    source = load_source(args.reference_model or settings.default_model_dir())
    runners = {"reference": TorchRunner(load_torch_encoder(source, attn_implementation="sdpa")),
               "fp32": OrtRunner(graph_path)}
    int8_dir = args.export_dir / args.int8_variant
    int8_path = int8_dir / Manifest.read(int8_dir).artifact.file if Manifest.exists(int8_dir) else None
    if int8_path:
        runners["int8"] = OrtRunner(int8_path)
    else:
        log.warning("%s is not exported: only the ceiling is shown", int8_dir)

    ids = np.random.default_rng(0).integers(1000, 29000, size=(args.batch, args.seq), dtype=np.int64)
    mask = np.ones_like(ids)
    log.info("end to end, %d rounds of %s in turn", args.rounds, ", ".join(runners))
    times = time_interleaved({name: lambda runner=runner: runner(ids, mask) for name, runner in runners.items()},
                             args.rounds, per_round=2, skip=1)
    end_to_end = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    log.info("end to end: %s", ", ".join(f"{name} {ms:.1f} ms" for name, ms in end_to_end.items()))
    timings = []
    for gemm in gemms:
        timings.append(time_gemm(gemm, rows, rounds=max(args.rounds // 2, 1)))
        log.info("GEMM %d x %s: FP32 %.2f ms, INT8 %.2f ms", rows, gemm.label(), timings[-1].fp32_ms, timings[-1].int8_ms)
    result = ceiling(end_to_end["reference"], end_to_end["fp32"], timings)

    print(f"\nINT8 ceiling, {graph_path} at b{args.batch}/s{args.seq} ({rows} rows); reference PyTorch FP32 (SDPA) "
          f"of the {source.num_layers}-layer {source.path.parent.name}/{source.path.name}; {machine()}")
    print(f"{'weight GEMM':<14}{'nodes':>6}{'FP32 ms':>9}{'INT8 ms':>9}{'INT8 speed-up':>15}")
    for t in timings:
        print(f"{t.gemm.label():<14}{t.gemm.count:>6}{t.fp32_ms:>9.2f}{t.int8_ms:>9.2f}{t.speedup:>14.2f}x")
    print(f"{'all, x nodes':<14}{'':>6}{result.gemm_fp32_ms:>9.1f}{result.gemm_int8_ms:>9.1f}{result.gemm_speedup:>14.2f}x")
    lines = [("PyTorch FP32 (reference)", result.reference_ms),
             (f"{args.fp32_variant} (GEMMs {result.gemm_fp32_ms:.0f} + rest {result.rest_ms:.0f})", result.fp32_ms),
             (f"INT8 ceiling (GEMMs {result.gemm_int8_ms:.0f} + rest {result.rest_ms:.0f})", result.int8_ideal_ms)]
    if "int8" in end_to_end:
        lines.append((f"{args.int8_variant} measured", end_to_end["int8"]))
    print(f"\n{'end to end':<52}{'ms':>8}{'vs reference':>14}")
    for label, ms in lines:
        print(f"{label:<52}{ms:>8.1f}{result.reference_ms / ms:>13.2f}x")
    ops = {}
    if int8_path:
        from bert_recsys.export.onnx_export import INPUT_NAMES

        ops = profile_ops(int8_path, {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})
        total = sum(ops.values())
        print(f"\n{args.int8_variant} by operator type (ONNX Runtime profiler, ms per run; the profiler adds a little):")
        for op, ms in list(ops.items())[:12]:
            print(f"  {op:<28}{ms:>8.1f}{100 * ms / total:>7.1f}%")
    verdict = goal_verdict(result, args.goal) if args.goal else None
    if verdict:
        print(f"\n{verdict}")

    report = {"machine": machine(), "graph": str(graph_path), "batch": args.batch, "seq": args.seq,
              "reference": f"PyTorch FP32 (SDPA), {source.path}", "end_to_end_ms": end_to_end,
              "gemms": [{**asdict(t.gemm), "fp32_ms": t.fp32_ms, "int8_ms": t.int8_ms} for t in timings],
              "ceiling": {**asdict(result), "rest_ms": result.rest_ms, "int8_ideal_ms": result.int8_ideal_ms,
                          "ratio": result.ratio, "gemm_speedup": result.gemm_speedup},
              "int8_ops_ms": ops, "goal": args.goal, "verdict": verdict}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(result, end_to_end.get("int8"), args.int8_variant, f"b{args.batch}/s{args.seq}, {machine()}",
         args.out.with_suffix(".png"))
    print(f"\nwritten {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(result: Ceiling, int8_ms: float | None, int8_name: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("PyTorch FP32", [(result.reference_ms, "tab:grey", None)]),
            ("ONNX Runtime FP32", [(result.gemm_fp32_ms, "tab:blue", "weight GEMMs"),
                                   (result.rest_ms, "tab:orange", "not GEMM")]),
            ("INT8 ceiling", [(result.gemm_int8_ms, "tab:green", "INT8 GEMMs"), (result.rest_ms, "tab:orange", None)])]
    if int8_ms is not None:
        bars.append((f"{int8_name} measured", [(int8_ms, "tab:purple", None)]))
    figure, axis = plt.subplots(figsize=(9, 3.6))
    for row, (name, segments) in enumerate(reversed(bars)):
        left = 0.0
        for width, color, label in segments:
            axis.barh(row, width, left=left, color=color, label=label)
            left += width
        axis.text(left, row, f"  {left:.0f} ms, {result.reference_ms / left:.2f}x", va="center", fontsize=8)
    axis.set_yticks(range(len(bars)), [name for name, _ in reversed(bars)])
    axis.set_xlabel("ms per batch (median)")
    axis.set_xlim(0, result.reference_ms * 1.3)
    axis.set_title(f"What INT8 can give at most: {title}", fontsize=8)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
