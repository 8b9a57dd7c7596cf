"""Benchmarks on noisy machines: perf_analyzer's unstable windows give a flagged figure, not a crash, and every
figure names the CPU model and its ISA flags."""
from __future__ import annotations

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.contracts.machine import cpu_model_and_flags
from bench.perf import STABILITY_LADDER, run_perf_analyzer

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma f16c\n"


def test_cpu_model_and_isa_flags():
    assert cpu_model_and_flags(XEON) == ("Intel(R) Xeon(R) Platinum 8480+",
                                         ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                          "amx_tile", "amx_int8", "amx_bf16"])
    assert cpu_model_and_flags(EPYC) == ("AMD EPYC", ["avx2", "fma", "f16c"])


FAKE = """#!/usr/bin/env bash
# Fails (as an unstable perf_analyzer does) until it has been called $SETTLE_AFTER times, then writes its CSV.
count=$(( $(cat "$STATE" 2>/dev/null || echo 0) + 1 )); echo "$count" > "$STATE"
out=""; while [[ $# -gt 0 ]]; do [[ "$1" == -f ]] && out="$2"; shift; done
if (( count <= SETTLE_AFTER )); then echo "Failed to obtain stable measurement within 5 measurement windows" >&2; exit 2; fi
printf 'Concurrency,Inferences/Second,p50 latency,p99 latency\\n1,250.5,3900,8100\\n' > "$out"
"""


@pytest.mark.parametrize("settle_after, stable", [(0, True), (1, False), (2, False)])
def test_an_unstable_perf_analyzer_gives_a_flagged_figure(tmp_path, monkeypatch, settle_after, stable):
    binary = tmp_path / "perf_analyzer"
    binary.write_text(FAKE)
    binary.chmod(0o755)
    monkeypatch.setenv("STATE", str(tmp_path / "calls"))
    monkeypatch.setenv("SETTLE_AFTER", str(settle_after))
    row = run_perf_analyzer("127.0.0.1:1", "embed", 1, {"TEXT": {"content": ["x"], "shape": [1]}}, 1, 2.0, binary)
    assert row["p50_ms"] == 3.9 and row["p99_ms"] == 8.1 and row["infer_per_s"] == 250.5
    assert row["stable"] is stable and row["window_s"] == 2.0 * STABILITY_LADDER[settle_after][0]


def test_perf_analyzer_that_never_answers_names_every_try(tmp_path, monkeypatch):
    binary = tmp_path / "perf_analyzer"
    binary.write_text(FAKE)
    binary.chmod(0o755)
    monkeypatch.setenv("STATE", str(tmp_path / "calls"))
    monkeypatch.setenv("SETTLE_AFTER", "99")
    with pytest.raises(RuntimeError, match="no figure for embed b1") as failed:
        run_perf_analyzer("127.0.0.1:1", "embed", 1, {}, 1, 1.0, binary)
    assert str(failed.value).count("exit 2") == len(STABILITY_LADDER)


def test_spearman_without_scipy_equals_scipys_with_ties():
    from scipy.stats import spearmanr

    from bench.gpu import spearman

    rng = np.random.default_rng(3)
    gold = rng.integers(0, 6, 300).astype(float)  # STS gold scores tie a lot
    scores = gold + rng.normal(0, 2, 300)
    assert abs(spearman(scores, gold) - spearmanr(scores, gold).statistic) < 1e-12


def test_flops_per_sequence_of_minilm_at_128_tokens():
    """2.87 GFLOP: at 83k seq/s eager FP16 that is 238 TFLOP/s, the figure the issue compares with the peak."""
    from bert_recsys.encoders.torch_bert import BertConfig, flops_per_sequence

    minilm = BertConfig(hidden=384, heads=12, layers=6, intermediate=1536, vocab=30522, max_positions=512)
    assert flops_per_sequence(minilm, 128) == 6 * (2 * 128 * (4 * 384**2 + 2 * 384 * 1536) + 4 * 128**2 * 384)
    assert round(flops_per_sequence(minilm, 128) / 1e9, 2) == 2.87


def test_stub_pythonpath_goes_first_on_the_stubs_path_only(monkeypatch, tmp_path):
    from bert_recsys.server.launcher import TritonServer

    monkeypatch.setenv("PYTHONPATH", "/existing")
    server = TritonServer(tmp_path, stub_pythonpath=("/numpy1",))
    assert server.environment()["PYTHONPATH"] == "/numpy1:/existing"
    monkeypatch.delenv("PYTHONPATH")
    assert TritonServer(tmp_path, stub_pythonpath=("/numpy1",)).environment()["PYTHONPATH"] == "/numpy1"
    assert "PYTHONPATH" not in TritonServer(tmp_path).environment()


def test_trace_breakdown_pairs_each_ensemble_request_with_its_steps_and_the_clients_timing(tmp_path):
    """A trace file as Triton 2.51 writes it: a trace's model line and each timestamp in separate objects."""
    import json

    from bench.trace import breakdown, medians, read_traces

    def stamps(trace_id, **ms):
        return [{"id": trace_id, "timestamps": [{"name": name, "ns": int(value * 1e6)}]} for name, value in ms.items()]

    entries = []
    for n, base in ((1, 0.0), (4, 100.0)):  # two embed requests, each with a tokenizer and an encoder step
        entries += [{"id": n, "model_name": "embed", "model_version": -1},
                    *stamps(n, GRPC_WAITREAD_END=base + 0.0, REQUEST_START=base + 0.1, REQUEST_END=base + 3.1,
                            GRPC_SEND_END=base + 3.3),
                    {"id": n + 1, "model_name": "tokenizer", "model_version": 1, "parent_id": n},
                    *stamps(n + 1, REQUEST_START=base + 0.2, QUEUE_START=base + 0.2, COMPUTE_START=base + 0.3,
                            COMPUTE_INPUT_END=base + 0.4, COMPUTE_OUTPUT_START=base + 0.9, COMPUTE_END=base + 1.0,
                            REQUEST_END=base + 1.0),
                    {"id": n + 2, "model_name": "encoder", "model_version": 1, "parent_id": n},
                    *stamps(n + 2, REQUEST_START=base + 1.1, QUEUE_START=base + 1.1, COMPUTE_START=base + 1.2,
                            COMPUTE_INPUT_END=base + 1.3, COMPUTE_OUTPUT_START=base + 2.8, COMPUTE_END=base + 2.9,
                            REQUEST_END=base + 3.0)]
    (tmp_path / "trace.json").write_text(json.dumps(entries))
    rows = breakdown(read_traces(tmp_path / "trace.json"), "embed", [4.0, 5.0])
    assert len(rows) == 2
    first = rows[0]
    assert abs(first["server_total"] - 3.0) < 1e-6 and abs(first["grpc in"] - 0.1) < 1e-6
    assert abs(first["client_and_protocol"] - (4.0 - 3.0 - 0.1 - 0.2)) < 1e-6
    assert abs(first["encoder compute"] - 1.5) < 1e-6 and abs(first["tokenizer queue"] - 0.1) < 1e-6
    assert abs(first["ensemble"] - (3.0 - 0.8 - 1.9)) < 1e-6
    assert abs(medians(rows)["client_total"] - 4.5) < 1e-9
    with pytest.raises(ValueError, match="2 traces of embed for 3 timed requests"):
        breakdown(read_traces(tmp_path / "trace.json"), "embed", [1.0, 2.0, 3.0])


def test_tune_chooses_the_fastest_gated_variant_by_objective():
    from bert_recsys.server.choice import choose

    rows = [{"variant": "onnx-fp32", "gate_passed": True, "b1_p50_ms": 3.1, "b32_seq_per_s": 52.0},
            {"variant": "onnx-int8", "gate_passed": True, "b1_p50_ms": 2.7, "b32_seq_per_s": 61.0},
            {"variant": "onnx-fp16", "gate_passed": True, "b1_p50_ms": 2.5, "b32_seq_per_s": 53.0},
            {"variant": "onnx-int8-dynamic", "gate_passed": False, "b1_p50_ms": 1.8, "b32_seq_per_s": 75.0}]
    assert choose(rows)["variant"] == "onnx-int8"           # a refused variant never wins, however fast
    assert choose(rows, "latency")["variant"] == "onnx-fp16"
    with pytest.raises(ValueError, match="no measured variant passed"):
        choose([rows[-1]])
    with pytest.raises(ValueError, match="objective 'cost'"):
        choose(rows, "cost")


def test_tune_duels_the_close_variants_and_an_interleaved_win_settles_the_choice():
    from bert_recsys.server.choice import choose, contenders, settle

    rows = [{"variant": "onnx-int8", "gate_passed": True, "b1_p50_ms": 6.0, "b32_seq_per_s": 48.8},
            {"variant": "onnx-fp32", "gate_passed": True, "b1_p50_ms": 7.3, "b32_seq_per_s": 36.7},
            {"variant": "ov-fp32", "gate_passed": True, "b1_p50_ms": 7.5, "b32_seq_per_s": 35.5},
            {"variant": "onnx-fp16", "gate_passed": True, "b1_p50_ms": 5.9, "b32_seq_per_s": 33.0},
            {"variant": "ov-int8", "gate_passed": True, "b1_p50_ms": 9.2, "b32_seq_per_s": 20.0},   # 2.4x: not close
            {"variant": "refused", "gate_passed": False, "b1_p50_ms": 1.0, "b32_seq_per_s": 47.0}]
    best = choose(rows)
    assert best["variant"] == "onnx-int8"
    assert [row["variant"] for row in contenders(rows, best)] == ["onnx-fp32", "ov-fp32"]   # closest first, at most 2
    assert [row["variant"] for row in contenders(rows, best, most=5)] == ["onnx-fp32", "ov-fp32", "onnx-fp16"]
    assert contenders(rows, best, within=1.2) == []
    fastest_b1 = choose(rows, "latency")
    assert fastest_b1["variant"] == "onnx-fp16"
    assert [row["variant"] for row in contenders(rows, fastest_b1, "latency")] == ["onnx-int8", "onnx-fp32"]

    assert settle("onnx-int8", []) == ("onnx-int8", "onnx-int8: fastest sequentially, no other within 1.5x")
    assert settle("onnx-int8", [], close=2) == ("onnx-int8",
                                                "onnx-int8: fastest sequentially; 2 close contender(s) not duelled")
    lost = [{"variant": "onnx-fp32", "best_ms": 600.0, "variant_ms": 750.0},
            {"variant": "ov-fp32", "best_ms": 610.0, "variant_ms": 595.0}]              # 0.975x: a tie, not a win
    assert settle("onnx-int8", lost) == ("onnx-int8",
                                         "onnx-int8: fastest sequentially, and no contender beat it by 3% interleaved")
    assert settle("onnx-int8", lost, margin=1.0)[0] == "ov-fp32"
    won = lost + [{"variant": "onnx-fp16", "best_ms": 620.0, "variant_ms": 590.0},
                  {"variant": "ov-int8", "best_ms": 600.0, "variant_ms": 540.0}]
    chosen, why = settle("onnx-int8", won)
    assert chosen == "ov-int8" and "0.900x onnx-int8's time interleaved" in why   # the largest win, not the first
    failed = {"variant": "onnx-fp16", "best": "onnx-int8", "error": "tritonserver exited 1"}
    assert settle("onnx-int8", [failed]) == ("onnx-int8", "onnx-int8: fastest sequentially; the duel of onnx-fp16 "
                                                          "failed (tritonserver exited 1)")
    chosen, why = settle("onnx-int8", [failed, *won])                               # a failed duel never wins
    assert chosen == "ov-int8" and why.endswith("the duel of onnx-fp16 failed (tritonserver exited 1)")
    with pytest.raises(ValueError, match="zero ms"):
        settle("onnx-int8", [{"variant": "onnx-fp32", "best_ms": 0.0, "variant_ms": 1.0}])


def test_tune_writes_the_choice_after_its_duels_and_keeps_going_when_one_fails(monkeypatch, tmp_path, capsys):
    import json
    from types import SimpleNamespace

    import bench.tune as tune
    from bert_recsys import logs
    from bert_recsys.export import pipeline

    figures = SimpleNamespace(spearman_ratio_confirmation=0.999, batch_invariance_min_cosine=1.0)
    manifest = SimpleNamespace(gate=SimpleNamespace(figures=figures))
    speeds = {"onnx-int8": (4.3, 43.3), "onnx-fp32": (5.2, 42.2), "onnx-fp16": (5.4, 42.1), "ov-int8": (9.3, 20.0)}
    monkeypatch.setattr(logs, "configure", lambda *a, **k: None)
    monkeypatch.setattr(tune, "TUNE_FILE", tmp_path / "tune.json")
    monkeypatch.setattr(tune, "passing_exports", lambda _: {name: manifest for name in speeds})
    monkeypatch.setattr(pipeline, "read_outcomes", lambda _: {})
    monkeypatch.setattr(pipeline, "not_served", lambda *a: [{"variant": "ov-int8-bf16", "status": "not supported here",
                                                            "detail": "no BF16"}])
    monkeypatch.setattr(tune, "measure", lambda variant, seconds: {"b1_p50_ms": speeds[variant][0],
                                                                   "b32_seq_per_s": speeds[variant][1], "stable": True})
    duelled = []

    def duel(best, contender, objective, rounds):
        duelled.append((best, contender, objective, rounds))
        if contender == "onnx-fp16":
            raise RuntimeError("tritonserver exited 1")
        return {"variant": contender, "best": best, "batch": 32, "rounds": rounds, "calls_each": 24,
                "best_ms": 740.0, "variant_ms": 690.0}

    monkeypatch.setattr(tune, "duel", duel)
    assert tune.main(["--duel-rounds", "3"]) == 0
    assert duelled == [("onnx-int8", "onnx-fp32", "throughput", 3), ("onnx-int8", "onnx-fp16", "throughput", 3)]
    record = json.loads((tmp_path / "tune.json").read_text())
    assert record["variant"] == "onnx-fp32" and record["sequential_best"] == "onnx-int8"   # 0.932x interleaved
    assert record["duels"][1] == {"variant": "onnx-fp16", "best": "onnx-int8", "error": "tritonserver exited 1"}
    assert "the duel of onnx-fp16 failed" in record["why"]
    out = capsys.readouterr().out
    chosen_lines = [line for line in out.splitlines() if "<- chosen" in line]
    assert len(chosen_lines) == 1 and chosen_lines[0].startswith("onnx-fp32 ")
    assert "interleaved: onnx-fp16 against onnx-int8 not run: tritonserver exited 1" in out
    assert "ov-int8-bf16  not supported here: no BF16" in out

    duelled.clear()
    assert tune.main(["--duel-rounds", "0"]) == 0
    record = json.loads((tmp_path / "tune.json").read_text())
    assert duelled == [] and record["variant"] == "onnx-int8"
    assert record["why"] == "onnx-int8: fastest sequentially; 2 close contender(s) not duelled"


def test_a_tuned_choice_holds_only_on_the_machine_it_was_measured_on():
    from bert_recsys.server.choice import tuned_variant

    here = {"cpu": "AMD EPYC", "flags": ["avx2", "fma"], "cores": 2}
    record = {"machine": here, "variant": "onnx-int8", "objective": "throughput", "measured_at": "t"}
    assert tuned_variant(record, here, {"onnx-int8", "onnx-fp32"})[0] == "onnx-int8"
    xeon = {"cpu": "Intel Xeon", "flags": ["avx2", "avx512_vnni"], "cores": 2}
    variant, why = tuned_variant(record, xeon, {"onnx-int8"})
    assert variant is None and "tuned on AMD EPYC" in why
    assert tuned_variant(record, {**here, "cores": 16}, {"onnx-int8"})[0] is None
    assert tuned_variant(record, here, {"onnx-fp32"})[0] is None        # no longer exported and gated
    assert tuned_variant(None, here, {"onnx-int8"}) == (None, "not tuned here yet (bert-recsys tune)")


def test_ndcg_at_10_with_binary_relevance():
    import numpy as np

    from bert_recsys.export.retrieval import ndcg_at_k

    documents = np.eye(4, dtype=np.float32)
    # Query 0 ranks its one judged document first: 1.0. Query 1 ranks its judged document (3) second, behind 2:
    # 1/log2(3). Query 2 has no judged document and is left out of the mean.
    queries = np.array([[1, 0, 0, 0], [0, 0, 1, 0.5], [0, 1, 0, 0]], dtype=np.float32)
    value = ndcg_at_k(queries, documents, [frozenset({0}), frozenset({3}), frozenset()], k=10)
    assert abs(value - (1.0 + 1 / np.log2(3)) / 2) < 1e-9
    # Two judged documents, found at ranks 1 and 3: (1 + 1/log2(4)) / (1 + 1/log2(3)).
    two = ndcg_at_k(np.array([[1, 0, 0.5, 0.4]], dtype=np.float32), documents, [frozenset({0, 3})], k=10)
    assert abs(two - (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))) < 1e-9


def _graph_with_gemms():
    """MatMul x W[4,8] twice, an activation x activation MatMul, a Gemm with transB over W[6,4], a fused
    Attention with QKV weight [4,12], and a MatMul whose constant is not a matrix."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros(shape, np.float32), name)
             for name, shape in (("w48", (4, 8)), ("w64", (6, 4)), ("qkv", (4, 12)), ("w3d", (2, 4, 8)))]
    node = helper.make_node
    nodes = [node("MatMul", ["x", "w48"], ["a"]), node("MatMul", ["x", "w48"], ["b"]),
             node("MatMul", ["a", "b"], ["c"]), node("Gemm", ["x", "w64"], ["d"], transB=1),
             node("Attention", ["x", "qkv", "bias", "mask"], ["e"], domain="com.microsoft", num_heads=2),
             node("MatMul", ["x", "w3d"], ["f"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph)


def test_the_ceiling_counts_every_weight_gemm_and_nothing_else():
    from bench.ceiling import Gemm, weight_gemms

    assert weight_gemms(_graph_with_gemms()) == [Gemm(4, 8, 2), Gemm(4, 6, 1), Gemm(4, 12, 1)]


def test_the_int8_gemm_timed_computes_the_product_it_stands_for():
    """MatMulInteger with the activations' zero point 128: (x - 128) @ w exactly, in int32."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from bench.ceiling import Gemm, gemm_model, time_gemm

    model = gemm_model(16, 24, int8=True)
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).astype(np.int64)
    x = np.random.default_rng(2).integers(0, 256, (5, 16)).astype(np.uint8)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.int32 and np.array_equal(got, (x.astype(np.int64) - 128) @ weight)
    timing = time_gemm(Gemm(16, 24, 3), rows=8, rounds=2)
    assert timing.fp32_ms > 0 and timing.int8_ms > 0 and timing.gemm.count == 3


def test_the_ceiling_is_the_reference_over_the_rest_plus_int8_gemms():
    from bench.ceiling import Gemm, GemmTiming, ceiling, goal_verdict

    timings = [GemmTiming(Gemm(384, 1536, 6), fp32_ms=20.0, int8_ms=10.0),
               GemmTiming(Gemm(384, 384, 12), fp32_ms=5.0, int8_ms=2.0)]
    result = ceiling(reference_ms=600.0, fp32_ms=500.0, timings=timings)
    assert (result.gemm_fp32_ms, result.gemm_int8_ms, result.rest_ms) == (180.0, 84.0, 320.0)
    assert result.ratio == 600.0 / 404.0 and result.gemm_speedup == 180.0 / 84.0
    assert "out of reach" in goal_verdict(result, 2.5) and "1.49x" in goal_verdict(result, 2.5)
    assert "within the ceiling" in goal_verdict(result, 1.4)
    # GEMMs timed alone can add up to more than the whole graph took: nothing is left, never less than nothing.
    assert ceiling(600.0, 150.0, timings).rest_ms == 0.0


def test_op_times_leave_the_warm_up_run_out_and_average_the_rest():
    from bench.ceiling import op_times

    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(ts, op, us):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": us, "args": {"op_name": op}}

    events = [run(0, 100), node(10, "MatMul", 9000),                                   # warm-up: left out
              run(200, 100), node(210, "MatMul", 3000), node(250, "Gelu", 1000),
              run(400, 100), node(410, "MatMul", 5000), node(450, "Gelu", 1000),
              {"cat": "Node", "name": "n460_fence_before", "ts": 460, "dur": 7000, "args": {"op_name": "Gelu"}}]
    assert op_times(events) == {"MatMul": 4.0, "Gelu": 1.0}
    with pytest.raises(ValueError, match="1 model runs"):
        op_times(events[:2])


def test_interleaved_timing_takes_turns_after_warming_each_up():
    from bench.timing import time_interleaved

    order = []
    times = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, per_round=2,
                             skip=1, warmup=1, pause_s=0)
    assert order == ["a", "b"] + ["a", "a", "a", "b", "b", "b"] * 3
    # The first call of each block is not counted.
    assert [len(t) for t in times.values()] == [6, 6] and all(x >= 0 for t in times.values() for x in t)


def test_tune_and_bench_list_each_variant_they_will_not_measure_with_why():
    from bert_recsys.export.pipeline import not_served
    from bert_recsys.export.variants import CPU_VARIANTS

    here = {"cpu": "AMD EPYC", "flags": ["avx2", "avx512_vnni"], "cores": 2}
    outcomes = {
        "onnx-int8": {"status": "written", "detail": "", "machine": here},
        "ov-int8": {"status": "refused", "detail": "batch invariance 0.997860 < 0.999", "machine": here},
        "ov-bf16": {"status": "skipped", "detail": "this CPU computes no BF16 natively", "machine": here},
        "onnx-fp16": {"status": "failed", "detail": "disk full", "machine": here},
        "ov-fp32": {"status": "up-to-date", "detail": "", "machine": here},
        "ov-int8-bf16": {"status": "skipped", "detail": "no BF16", "machine": {**here, "cpu": "Intel Xeon"}},
    }
    rows = {row["variant"]: row for row in not_served(outcomes, {"onnx-int8"}, CPU_VARIANTS, here)}
    assert set(rows) == {"onnx-fp32", "onnx-fp16", "ov-fp32", "ov-int8", "ov-bf16", "ov-int8-bf16"}
    assert rows["ov-int8"] == {"variant": "ov-int8", "status": "refused", "detail": "batch invariance 0.997860 < 0.999"}
    assert rows["ov-bf16"]["status"] == "not supported here"
    assert rows["onnx-fp16"]["status"] == "failed"
    assert rows["onnx-fp32"]["status"] == "not exported"
    assert rows["ov-fp32"]["status"] == "missing"   # said written, but its gated manifest is gone
    assert rows["ov-int8-bf16"]["status"] == "stale" and "Intel Xeon" in rows["ov-int8-bf16"]["detail"]
    unchecked = {row["variant"]: row for row in not_served(outcomes, {"onnx-int8"}, CPU_VARIANTS)}
    assert unchecked["ov-int8-bf16"]["status"] == "not supported here"
    assert not_served(outcomes, {"onnx-int8", "ov-int8", "ov-bf16"}, ("onnx-int8", "ov-int8", "ov-bf16"), here) == []


def test_the_makefile_exports_the_same_cpu_variants_tune_and_bench_measure():
    import re

    from bert_recsys.export.variants import CPU_VARIANTS, VARIANTS

    makefile = (settings.REPO_ROOT / "Makefile").read_text()
    [listed] = re.findall(r"^CPU_VARIANTS := (.+)$", makefile, flags=re.M)
    assert tuple(listed.split(",")) == CPU_VARIANTS and set(CPU_VARIANTS) <= set(VARIANTS)
    for target in ("bench", "tune", "bench-peers", "report"):
        recipe = re.search(rf"^{re.escape(target)}:.*\n\t(.+)$", makefile, flags=re.M).group(1)
        assert "--keep-going" in recipe and "$(CPU_VARIANTS)" in recipe, target


def test_export_records_each_variants_last_outcome_and_keeps_the_others():
    from bert_recsys.export.pipeline import Outcome, merge_outcomes
    from bert_recsys.export.variants import VariantStatus

    machine = {"cpu": "AMD EPYC", "flags": ["avx2"], "cores": 2}
    first = merge_outcomes({}, [Outcome("ov-int8", VariantStatus.REFUSED, "batch invariance"),
                                Outcome("onnx-int8", VariantStatus.WRITTEN)], machine, "t1")
    second = merge_outcomes(first, [Outcome("ov-int8", VariantStatus.WRITTEN)], machine, "t2")
    assert second["variants"]["ov-int8"] == {"status": "written", "detail": "", "machine": machine, "at": "t2"}
    assert second["variants"]["onnx-int8"]["at"] == "t1"


def test_export_keep_going_exits_0_while_one_variant_is_in_place():
    from bert_recsys.export.__main__ import exit_status
    from bert_recsys.export.pipeline import Outcome
    from bert_recsys.export.variants import VariantStatus

    mixed = [Outcome("onnx-int8", VariantStatus.WRITTEN), Outcome("ov-int8", VariantStatus.REFUSED, "gate"),
             Outcome("ov-bf16", VariantStatus.SKIPPED, "no BF16")]
    assert exit_status(mixed, variants_named=True, keep_going=False) == 1
    assert exit_status(mixed, variants_named=True, keep_going=True) == 0
    assert exit_status(mixed[1:], variants_named=True, keep_going=True) == 1   # nothing in place
    assert exit_status([mixed[0], mixed[2]], variants_named=False, keep_going=False) == 0  # default list: skip is fine


def test_each_openvino_int8_variant_keeps_its_own_fp32_layers_unless_told():
    from pathlib import Path

    from bert_recsys.export.pipeline import ExportOptions
    from bert_recsys.export.variants import VARIANTS

    options = ExportOptions(model_dir=Path("model"), out_dir=Path("out"), variants=[])
    assert options.ov_int8_fp32_layers(VARIANTS["ov-int8"]) == (0,)
    assert options.ov_int8_fp32_layers(VARIANTS["ov-int8-bf16"]) == ()
    told = ExportOptions(model_dir=Path("model"), out_dir=Path("out"), variants=[], int8_fp32_layers=(0, 5))
    assert told.ov_int8_fp32_layers(VARIANTS["ov-int8-bf16"]) == (0, 5)
    # the layers and the inference precision are part of the recipe: a change rebuilds and re-gates
    assert options.recipe(VARIANTS["ov-int8"])["int8_fp32_layers"] == (0,)
    assert options.recipe(VARIANTS["ov-int8-bf16"])["inference_precision"] == "bf16"


def test_an_outcomes_record_that_cannot_be_written_never_fails_the_export(tmp_path):
    from bert_recsys.export.pipeline import Outcome, record_outcomes
    from bert_recsys.export.variants import VariantStatus

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    # Writing the record raises NotADirectoryError inside: it is caught (and logged), never raised to the export.
    assert record_outcomes(not_a_folder, [Outcome("onnx-int8", VariantStatus.WRITTEN)]) is None
    assert not_a_folder.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_quantizing_leaves_the_callers_logging_as_it_was(tmp_path):
    """ONNX Runtime's quantizer logs through the root logger; the export quiets it for the call only."""
    import logging

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bert_recsys.export.onnx_export import quantize_int8_dynamic

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        quantize_int8_dynamic(tmp_path / "m.onnx", tmp_path / "q.onnx", [])
        assert root.level == logging.INFO and (tmp_path / "q.onnx").is_file()
    finally:
        root.setLevel(before)


def test_engine_median_takes_only_the_asked_shape_after_the_skipped_calls(tmp_path):
    """The encoder model's diagnostic file: [rows, tokens, seconds] per engine call, the warm-up's shapes included."""
    import json

    from bench.trace import engine_median_ms

    path = tmp_path / "engine_times.json"
    assert engine_median_ms(path, 1, 18, 0) is None  # no file: no figure, not a made-up one
    calls = [[64, 256, 0.5], [1, 18, 0.009], [1, 18, 0.008]] + [[1, 18, s / 1000] for s in (1.0, 2.0, 4.0)] + [[32, 128, 0.2]]
    path.write_text(json.dumps(calls))
    assert engine_median_ms(path, 1, 18, 2) == pytest.approx(2.0)
    assert engine_median_ms(path, 1, 18, 0) == pytest.approx(4.0)  # 9, 8, 1, 2, 4 ms
    assert engine_median_ms(path, 2, 18, 0) is None
    path.write_text('[[1, 18, 0.0')  # half a file (never written so, but never a crash either)
    assert engine_median_ms(path, 1, 18, 0) is None


def test_warm_content_centres_on_the_training_items_only():
    """The text cosines that join EASE^R's Gram matrix: the mean removed is the training items' (no test item's
    vector moves it), and the result is a cosine matrix (unit diagonal, symmetric, positive semi-definite)."""
    from bench.warm_content import centred_cosines

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(6, 4)).astype(np.float32) + 5.0   # a strong common direction, as sentence vectors have
    trained = np.array([0, 1, 2, 3])
    s = centred_cosines(vectors, trained)
    moved = vectors.copy()
    moved[4:] += 100.0                                            # items outside training must not change the mean
    assert np.allclose(centred_cosines(moved, trained)[:4, :4], s[:4, :4], atol=1e-5)
    assert np.allclose(np.diag(s), 1.0, atol=1e-5) and np.allclose(s, s.T, atol=1e-6)
    assert np.linalg.eigvalsh(s.astype(np.float64)).min() > -1e-4
    raw = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert (raw @ raw.T)[:4, :4].mean() > 0.9 > s[:4, :4].mean()  # the common direction is gone



def test_trace_adds_the_tokenizer_step_ensemble_only_beside_an_encoder_that_takes_text(export_dir, tmp_path):
    """bench trace's comparison in one server: `embed` (the encoder alone, sent text) against the same encoder behind
    the tokenizer model; with an encoder that takes only ids there is nothing to compare, and nothing is added."""
    from dataclasses import replace

    from bert_recsys import settings
    from bert_recsys.model_repository.render import build_repository
    from bert_recsys.rollout.repository import LiveRepository
    from bench.trace import add_two_step_embed

    s = settings.SETTINGS
    repository = build_repository(s, export_dir, "onnx-int8", "embedded", tmp_path / "text")
    name = add_two_step_embed(repository, s)
    steps = LiveRepository(repository, s).config(name).ensemble_scheduling.step
    assert [(step.model_name, dict(step.input_map)) for step in steps] == [
        ("tokenizer", {"TEXT": "TEXT"}), ("encoder", {"input_ids": "input_ids", "attention_mask": "attention_mask"})]
    assert steps[1].model_version == 1 and (repository / name / "1").is_dir()
    ids_only = replace(s, instances=replace(s.instances, encoder_tokenizes=False))
    other = build_repository(ids_only, export_dir, "onnx-int8", "embedded", tmp_path / "ids")
    assert add_two_step_embed(other, ids_only) is None and not (other / name).exists()


def test_warm_blends_choose_the_base_encoders_setting_on_validation_and_report_the_test_bound_apart():
    """The validation choice never looks at test, never picks a fine-tune's row (trained on the validation targets),
    and the bound on test is reported beside it, not instead of it."""
    from bench.warm_content import blend_summary

    def rows(ease, **systems):
        return {"ease": {"recall@10": ease}} | {k.replace("__", " | ").replace("_", " "): {"recall@10": v}
                                                  for k, v in systems.items()}

    validation = rows(0.10, text__base__w_1=0.11, text__base__w_2=0.12, text__tuned__w_1=0.20, gated_text__base__c_3=0.09)
    test = rows(0.08, text__base__w_1=0.09, text__base__w_2=0.082, text__tuned__w_1=0.10, gated_text__base__c_3=0.07)
    summary = {row["family"]: row for row in blend_summary(validation, test)}
    assert summary["text"]["chosen"] == "text | base | w 2"
    assert summary["text"]["validation"] == pytest.approx(0.2) and summary["text"]["test"] == pytest.approx(0.025)
    assert summary["text"]["best_on_test"] == "text | tuned | w 1" and summary["text"]["best_test"] == pytest.approx(0.25)
    assert summary["gated text"]["test"] == pytest.approx(-0.125)


def test_maxsim_and_the_text_graph_on_a_small_catalog():
    from bench.warm_content import maxsim, text_graph

    unit = np.eye(4, dtype=np.float32)
    unit[3] = np.array([0.6, 0.8, 0, 0], dtype=np.float32)
    # Item 3 resembles liked items 0 (0.6) and 1 (0.8): with k=1 its best, with k=2 their mean.
    assert maxsim(unit, [0, 1], k=1)[3] == pytest.approx(0.8)
    assert maxsim(unit, [0, 1], k=2)[3] == pytest.approx(0.7)
    assert maxsim(unit, [0], k=3)[2] == pytest.approx(0.0)  # k capped at the number of liked items
    graph = text_graph(unit, 1).toarray()
    assert np.allclose(graph.sum(axis=1)[[0, 1, 3]], 1.0) and graph[3, 1] == pytest.approx(1.0)
    assert graph[0, 3] == pytest.approx(1.0) and np.all(np.diag(graph) == 0)  # never its own neighbour


def test_next_likes_learns_which_text_a_users_next_likes_have_from_the_training_part_alone():
    """Two tastes on a small catalog: users who like one cluster's text like more of it after each cut, so the learnt
    map scores that cluster above the other from the profile alone; an item nobody liked after a cut gets nothing."""
    from bert_recsys.client.catalog import Interactions
    from bench.warm_content import next_likes, text_profile

    rng = np.random.default_rng(0)
    unit = np.zeros((13, 3), dtype=np.float32)
    unit[:6, 0], unit[6:12, 1], unit[12, 2] = 1.0, 1.0, 1.0
    unit[:12] += rng.normal(0, 0.1, (12, 3)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    users, items, times = [], [], []
    for user in range(20):
        cluster = range(6) if user % 2 == 0 else range(6, 12)
        for t, item in enumerate(rng.permutation(list(cluster))):
            users.append(user), items.append(100 + int(item)), times.append(t)
    train = Interactions.from_rows(users, items, [5.0] * len(users), times)
    column = {100 + c: c for c in range(13)}   # item 112 is scored but nobody rated it
    liked_a = [0, 1, 2]
    for bilinear in (False, True):
        v = next_likes(train, column, unit, (0.5,), 0, 1.0, bilinear=bilinear)
        assert v.shape == (3, 13)
        scores = text_profile(unit, liked_a, 0) @ v
        assert scores[:6].mean() > scores[6:12].mean() + 0.1, scores
        scores_b = text_profile(unit, [6, 7], 0) @ v
        assert scores_b[6:12].mean() > scores_b[:6].mean() + 0.1, scores_b
    assert np.all(next_likes(train, column, unit, (0.5,), 0, 1.0)[:, 12] == 0)
    assert np.allclose(text_profile(unit, [0, 1, 2, 7], 2), unit[[2, 7]].mean(axis=0))
    assert np.all(text_profile(unit, [], 0) == 0)
    with pytest.raises(ValueError, match="no user has positives on both sides"):
        next_likes(train.take(train.time < 2), column, unit, (0.5,), 0, 1.0)


def test_the_ranker_learns_from_the_split_below_and_its_text_features_find_the_users_cluster():
    """Eight tastes on a small catalog whose CF channel knows nothing: the trees with the text features rank the
    user's own cluster first, the trees without them cannot; the labels come from the truth alone, and rows with
    one label only are refused."""
    from types import SimpleNamespace

    from bert_recsys.client.catalog import Interactions
    from bench import warm_content as wc

    rng = np.random.default_rng(1)
    n, clusters = 240, 8
    unit = np.eye(clusters, dtype=np.float32)[np.arange(n) // (n // clusters)]
    unit += rng.normal(0, 0.2, unit.shape).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    item_ids = np.arange(1000, 1000 + n)
    users, items, times, truth = [], [], [], {}
    for user in range(120):   # each likes 20 of its cluster's 30 items, and the other 10 next
        picked = rng.permutation(np.arange(n // clusters)) + (user % clusters) * (n // clusters)
        for t, c in enumerate(picked[:20]):
            users.append(user), items.append(int(item_ids[c])), times.append(t)
        truth[user] = {int(item_ids[c]) for c in picked[20:]}
    ratings = [5.0] * len(users)
    for t in range(5):  # a user who liked nothing: ranked as EASE^R alone ranks it, and counted
        users.append(120), items.append(int(item_ids[t])), times.append(t), ratings.append(2.0)
    truth[120] = {int(item_ids[7])}
    train = Interactions.from_rows(users, items, ratings, times)
    # A CF channel that knows nothing: random weights, so only the text can tell the clusters apart.
    scorer = SimpleNamespace(item_ids=item_ids, column={int(i): c for c, i in enumerate(item_ids)},
                             weights=rng.normal(0, 1, (n, n)).astype(np.float32))
    rows = wc.ranker_rows(scorer, train, truth, unit)
    assert len(rows) == 121 and rows[0]["features"].shape[1] == len(wc.CF_FEATURES + wc.TEXT_FEATURES)
    assert rows[-1]["user"] == 120 and len(rows[-1]["candidates"]) == 0
    for r in rows:
        assert not set(r["candidates"]) & set(r["seen"])
        assert set(item_ids[r["candidates"][r["labels"] == 1]]) <= r["truths"]
    below, measured = rows[:80], rows[80:]
    figures = wc.ranker_scores(below, measured, item_ids, n)
    assert {f["users"] for f in figures.values()} == {41}
    with_text = figures["ranker | base | 100 trees, 7 leaves"]["recall@10"]
    without = figures["ranker without text | base | 100 trees, 7 leaves"]["recall@10"]
    assert with_text > 0.78 and without < 0.3, (with_text, without)
    # A fine-tuned encoder's vectors add the same six features after them, and a family can use those alone.
    tuned_rows = wc.ranker_rows(scorer, train, truth, unit, tuned=unit[:, ::-1].copy())
    assert tuned_rows[0]["features"].shape[1] == len(wc.ALL_FEATURES) == 17
    assert np.allclose(tuned_rows[0]["features"][:, :11], rows[0]["features"])
    tuned_only = wc.ranker_scores(tuned_rows[:80], tuned_rows[80:], item_ids, n,
                                  {"tuned": wc.CF_FEATURES + wc.TUNED_FEATURES}, {"t": (100, 7)})
    assert tuned_only["tuned | base | t"]["recall@10"] > 0.78
    for r in below:
        r["labels"] = np.zeros_like(r["labels"])
    with pytest.raises(ValueError, match="one label only"):
        wc.fit_ranker(below, wc.CF_FEATURES, (10, 4))
