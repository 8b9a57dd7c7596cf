"""The peers' benchmark harness (bench/peers): what it parses, how it scores and what it picks, without a peer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bert_recsys import settings
from bench.peers import harness


def result(**overrides) -> str:
    base = {"peer": "st-openvino-int8", "b1_s": [0.001, 0.002, 0.003], "b32_s": [0.1, 0.09, 0.2], "versions": {},
            "load_s": 1.0, "details": {}}
    return json.dumps({**base, **overrides})


def test_a_workers_result_is_parsed_or_refused_with_what_is_wrong():
    parsed = harness.parse_result(result())
    assert parsed["peer"] == "st-openvino-int8"
    with pytest.raises(ValueError, match="not JSON"):
        harness.parse_result("Traceback (most recent call last)")
    with pytest.raises(ValueError, match="lacks 'details'"):
        harness.parse_result(json.dumps({k: v for k, v in json.loads(result()).items() if k != "details"}))
    with pytest.raises(ValueError, match="lacks 'b32_s'"):
        harness.parse_result(json.dumps({"peer": "x", "b1_s": [0.1], "versions": {}}))
    with pytest.raises(ValueError, match="no positive timings"):
        harness.parse_result(result(b32_s=[]))
    with pytest.raises(ValueError, match="no positive timings"):
        harness.parse_result(result(b1_s=[0.001, -1]))


def test_speed_is_the_median_and_throughput_follows_from_it():
    figures = harness.speed([0.001, 0.003, 0.002], [0.2, 0.1, 0.4])
    assert figures["b1_p50_ms"] == pytest.approx(2.0) and figures["b32_p50_ms"] == pytest.approx(200.0)
    assert figures["b32_texts_per_s"] == pytest.approx(32 / 0.2)


def row(name, b32, ratio, invariance, kind="worker"):
    return {"row": name, "kind": kind, "b32_p50_ms": b32, "b1_p50_ms": 1.0, "b32_texts_per_s": 32000 / b32,
            "spearman_ratio_confirmation": ratio, "batch_invariance_min_cosine": invariance}


def test_the_fastest_peer_is_chosen_among_those_holding_the_gates():
    rows = [row("fast-but-batch-dependent", 80, 0.999, 0.95), row("fast-but-worse", 85, 0.997, 1.0),
            row("holds", 90, 0.9990, 0.9999), row("slow", 200, 1.0, 1.0), row("ours", 50, 1.0, 1.0, kind="project"),
            row("server", 95, 1.0, 1.0, kind="infinity"),
            {"row": "broken", "kind": "worker", "error": "pip failed"}]
    assert harness.fastest_holding_gates(rows)["row"] == "holds"
    assert harness.fastest_holding_gates(rows[:2]) is None
    assert harness.fastest_holding_gates([r for r in rows if r["row"] != "holds"])["row"] == "server"  # a server peer counts


def test_the_table_names_the_cpu_and_lists_a_peer_that_did_not_run_with_why():
    text = harness.table([row("holds", 90, 0.999, 0.9999), {"row": "infinity-optimum", "kind": "infinity",
                                                          "error": "No onnx files found"}], "AMD EPYC (avx2), 2 cores")
    assert "AMD EPYC (avx2), 2 cores" in text.splitlines()[0]
    assert "infinity-optimum" in text and "not run: No onnx files found" in text
    assert "90.0" in text and "0.99900" in text


def test_quality_scores_spearman_halves_and_batch_invariance():
    from bert_recsys.export.gate import sts_half

    rng = np.random.default_rng(0)
    pairs = [(f"a {i}", f"b {i}", float(i % 5)) for i in range(60)]
    assert {sts_half(a, b) for a, b, _ in pairs} == {"selection", "confirmation"}
    vectors = rng.normal(size=(120, 8)).astype(np.float32)
    gate = rng.normal(size=(10, 8)).astype(np.float32)
    shifted = gate.copy()
    shifted[3] += 0.5 * rng.normal(size=8)  # one text's vector changes with its batch-mates
    figures = harness.quality(vectors, gate, shifted, pairs, {"confirmation": 0.5, "selection": 0.5})
    cosine = float(gate[3] @ shifted[3] / np.linalg.norm(gate[3]) / np.linalg.norm(shifted[3]))
    assert figures["batch_invariance_min_cosine"] == pytest.approx(cosine, rel=1e-5) and cosine < 0.999
    assert figures["spearman_ratio_confirmation"] == pytest.approx(figures["spearman_confirmation"] / 0.5)


def test_texts_of_exactly_the_asked_token_count_and_all_distinct():
    from transformers import AutoTokenizer

    from bert_recsys.export.gate import load_gate_sentences

    tokenizer = AutoTokenizer.from_pretrained(settings.default_model_dir())
    texts = harness.texts_of_tokens(tokenizer, load_gate_sentences()[0], 128, 32)
    assert len(set(texts)) == 32
    assert {len(tokenizer(text)["input_ids"]) for text in texts} == {128}
    with pytest.raises(ValueError, match="distinct texts"):
        harness.texts_of_tokens(tokenizer, ["one short line"], 128, 2)


def test_the_worker_imports_nothing_of_this_project():
    """worker.py runs under each peer's own interpreter, where none of our packages is installed."""
    from tests.unit.test_contracts import LAYERS, imports

    worker = settings.REPO_ROOT / "bench" / "peers" / "worker.py"
    assert not imports(worker) & set(LAYERS)
    assert not imports(worker) - {"__future__", "json", "os", "sys", "time", "pathlib", "numpy", "csv", "importlib",
                                  "sentence_transformers", "fastembed"}


def test_every_peer_venv_has_its_pinned_requirements():
    for venv in {peer.venv for peer in harness.PEERS if peer.venv}:
        lines = [line for line in (harness.HERE / f"requirements-{venv}.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        import re

        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==\d[\w.]*", line) for line in lines), venv


def test_waiting_for_a_server_names_its_exit_and_its_log_or_the_timeout(tmp_path):
    import subprocess
    import sys

    from bench.gateway import stop, wait_http
    from bert_recsys.server.launcher import free_port

    log = tmp_path / "server.log"
    with open(log, "w") as handle:
        dead = subprocess.Popen([sys.executable, "-c", "import sys; print('no model files found'); sys.exit(3)"],
                                stdout=handle, stderr=subprocess.STDOUT)
        dead.wait()
    with pytest.raises(RuntimeError, match="exited with status 3.*no model files found"):
        wait_http(dead, free_port(), "/health", 5, log)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError, match="no answer on 127.0.0.1:"):
            wait_http(silent, free_port(), "/health", 0.5, log)
    finally:
        stop(silent)
    assert silent.returncode is not None


def test_the_b1_duel_picks_the_fastest_in_process_peer_and_compares_interleaved_blocks():
    from bench.peers.harness import duel_summary, in_process_b1_contenders

    rows = [{"peer": "st-onnx", "kind": "worker", "b1_p50_ms": 3.9},
            {"peer": "fastembed", "kind": "worker", "b1_p50_ms": 1.6},
            {"peer": "st-openvino", "kind": "worker", "error": "exited 1"},
            {"peer": "infinity-optimum", "kind": "infinity", "b1_p50_ms": 1.0},   # a server, not in process
            {"peer": "project-bare", "kind": "project", "b1_p50_ms": 1.2}]        # ours
    assert in_process_b1_contenders(rows)[0]["peer"] == "fastembed"
    assert in_process_b1_contenders([rows[2], rows[3]]) == []

    # What the goals compare: embed b1 with the fastest in-process peer, embed b32 with the fastest peer holding the
    # gates, the gateway with the faster infinity engine at b32, at b32 and b1.
    from bench.peers.harness import duels_to_run

    measured = [{**rows[1], "b32_p50_ms": 250.0, "spearman_ratio_confirmation": 0.998, "batch_invariance_min_cosine": 0.95},
                {"peer": "st-openvino-int8", "kind": "worker", "b1_p50_ms": 2.6, "b32_p50_ms": 170.0,
                 "spearman_ratio_confirmation": 1.0009, "batch_invariance_min_cosine": 1.0},
                {"peer": "infinity-torch", "kind": "infinity", "b1_p50_ms": 18.0, "b32_p50_ms": 750.0},
                {"peer": "infinity-optimum", "kind": "infinity", "b1_p50_ms": 10.0, "b32_p50_ms": 550.0}]
    planned = [(ours, batch, peer.name) for ours, batch, peer in duels_to_run(measured)]
    # st-openvino-int8's b1 (2.6) is within 1.5x of fastembed's (1.6 x 1.5 = 2.4)? No: only fastembed contends.
    assert planned == [("embed", "b1", "fastembed"), ("embed", "b32", "st-openvino-int8"),
                       ("gateway", "b32", "infinity-optimum"), ("gateway", "b1", "infinity-optimum")]
    assert duels_to_run([]) == []
    # Sequential rows drift: every in-process peer close to the fastest gets its own b1 duel, fastest first.
    close = [{**measured[1], "b1_p50_ms": 2.3}, {"peer": "st-onnx", "kind": "worker", "b1_p50_ms": 2.5},
             {"peer": "st-onnx-qint8", "kind": "worker", "b1_p50_ms": 2.2}, measured[0] | {"b1_p50_ms": 2.4},
             {"peer": "st-torch", "kind": "worker", "b1_p50_ms": 9.9}]
    assert [(batch, peer.name) for ours, batch, peer in duels_to_run(close) if batch == "b1"] == [
        ("b1", "st-onnx-qint8"), ("b1", "st-openvino-int8"), ("b1", "fastembed")]  # at most 3; st-torch is far

    # Two rounds; the first 5 calls of each block (0.1 s: the other side's threads) are not counted.
    embed = [[0.1] * 5 + [0.0030] * 10, [0.1] * 5 + [0.0026] * 10]
    peer = [[0.1] * 5 + [0.0020] * 10, [0.1] * 5 + [0.0018] * 10]
    summary = duel_summary(embed, peer, settle=5)
    assert summary["ours_ms"] == pytest.approx(2.8) and summary["peer_ms"] == pytest.approx(1.9)
    assert summary["gap_ms"] == pytest.approx(0.9) and summary["ours_over_peer"] == pytest.approx(2.8 / 1.9)
    assert summary["calls_each"] == 20 and summary["rounds"] == 2

    # The b1 verdict: the gap to the peer fastest interleaved, and the largest gap of all beside it.
    from bench.peers.harness import b1_verdict

    duels = [{"ours": "embed", "batch": "b1", "peer": "a", "ours_ms": 2.5, "peer_ms": 1.9, "gap_ms": 0.6},
             {"ours": "embed", "batch": "b1", "peer": "b", "ours_ms": 2.9, "peer_ms": 2.0, "gap_ms": 0.9},
             {"ours": "embed", "batch": "b1", "peer": "c", "error": "exited 1"},
             {"ours": "embed", "batch": "b32", "peer": "a", "ours_ms": 170.0, "peer_ms": 100.0, "gap_ms": 70.0},
             {"ours": "gateway", "batch": "b1", "peer": "d", "ours_ms": 3.0, "peer_ms": 1.0, "gap_ms": 2.0}]
    verdict = b1_verdict(duels)
    assert (verdict["peer"], verdict["gap_ms"], verdict["duels"]) == ("a", 0.6, 2)
    assert (verdict["strictest_peer"], verdict["strictest_gap_ms"]) == ("b", 0.9)
    assert b1_verdict(duels[2:3]) is None
    assert summary["per_round"][1] == {"ours_ms": pytest.approx(2.6), "peer_ms": pytest.approx(1.8)}
    with pytest.raises(ValueError, match="as many blocks"):
        duel_summary(embed, peer[:1], settle=5)
    with pytest.raises(ValueError, match="more than the 5 calls"):
        duel_summary([[0.1] * 5], [[0.1] * 6], settle=5)


def test_the_worker_times_b1_blocks_on_demand_until_its_input_ends():
    import io
    import json

    from bench.peers.worker import duel

    calls = []
    answers = io.StringIO()
    batches = {"b1": ["one text"], "b32": ["a", "b"]}
    blocks = duel(lambda texts: calls.append(list(texts)), batches, io.StringIO("b1 3\nb32 2\n"), answers)
    lines = answers.getvalue().splitlines()
    assert blocks == 2 and lines[0] == "ready" and len(calls) == 5
    assert calls[0] == ["one text"] and calls[3] == ["a", "b"]
    assert [len(json.loads(line)) for line in lines[1:]] == [3, 2]
    assert all(t >= 0 for t in json.loads(lines[1]))
    for bad in ("b1 0\n", "b8 3\n"):
        with pytest.raises(ValueError, match="at least one call"):
            duel(lambda texts: None, batches, io.StringIO(bad), io.StringIO())


def test_the_dynamic_int8_file_is_found_under_the_name_its_config_gave_it(tmp_path):
    """avx2's config writes model_quint8_avx2.onnx, avx512_vnni's model_qint8_avx512_vnni.onnx: a name assumed from
    one CPU broke st-onnx-qint8 and fastembed on the other (an AVX2 EPYC, 2026-12-07)."""
    from bench.peers.worker import dynamic_int8_file

    assert dynamic_int8_file(tmp_path, "avx2") is None
    (tmp_path / "onnx").mkdir()
    for name in ("model.onnx", "model_quint8_avx2.onnx", "model_qint8_avx512_vnni.onnx"):
        (tmp_path / "onnx" / name).write_bytes(b"")
    assert dynamic_int8_file(tmp_path, "avx2") == "onnx/model_quint8_avx2.onnx"
    assert dynamic_int8_file(tmp_path, "avx512_vnni") == "onnx/model_qint8_avx512_vnni.onnx"
    assert dynamic_int8_file(tmp_path, "avx512") is None  # avx512_vnni's file is not avx512's
    assert dynamic_int8_file(tmp_path, "arm64") is None


def test_a_failed_workers_reason_is_its_exception_line_not_the_end_of_a_long_message():
    log = ("2026-12-07T02:00:20 peer st-onnx-qint8: loading\nTraceback (most recent call last):\n"
           '  File "worker.py", line 60, in st_model\n'
           "ValueError: Unrecognized model in build/peers/work/st-onnx. Should have a `model_type` key, one of: "
           + ", ".join(f"type{i}" for i in range(200)) + "\n")
    line = harness.failure_line(log)
    assert line.startswith("ValueError: Unrecognized model in build/peers/work/st-onnx") and len(line) == 240
    ort = ("Traceback (most recent call last):\n  File \"worker.py\", line 9\n    raise\n"
           "onnxruntime.capi.onnxruntime_pybind11_state.NoSuchFile: [ONNXRuntimeError] : 3 : NO_SUCHFILE\n"
           "  note: an indented line after it\n")
    assert harness.failure_line(ort).startswith("onnxruntime.capi.onnxruntime_pybind11_state.NoSuchFile: ")
    # raise SystemExit("...") prints its message alone, after whatever the worker logged
    exited = ("2026-12-07T02:03:00 peer fastembed: loading\n" + "W: a long warning " * 30 + "\n"
              "fastembed runs the st-onnx-qint8 peer's file, not found: work/st-onnx/onnx/model_*int8_avx2.onnx\n")
    assert harness.failure_line(exited) == ("fastembed runs the st-onnx-qint8 peer's file, not found: "
                                            "work/st-onnx/onnx/model_*int8_avx2.onnx")
    assert harness.failure_line("") == "(its log is empty)"


def test_the_http_client_sends_again_once_when_the_server_dropped_its_idle_connection():
    """uvicorn closes an idle keep-alive connection after 5 s (here: after every response, without saying so)."""
    import http.server
    import threading

    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["input"]
            served.append(len(texts))
            body = json.dumps({"data": [{"index": i, "embedding": [3.0, 4.0]} for i in range(len(texts))]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True  # dropped, while the client believes it alive

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = harness.HttpEmbeddings(server.server_address[1], "/embeddings", "model")
        for _ in range(3):
            vectors = client(["a", "b"])
            assert vectors.shape == (2, 2) and np.allclose(vectors[0], [0.6, 0.8])
        client.close()
        assert served == [2, 2, 2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_harness_reads_blocks_from_a_worker_process_and_ends_a_hung_one(tmp_path):
    import sys
    import time

    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        "import json, sys, time\n"
        "mode = sys.argv[1]\n"
        "print('loading', file=sys.stderr, flush=True)\n"
        "if mode == 'hang':\n"
        "    time.sleep(60)\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    batch, calls = line.split()\n"
        "    print(json.dumps([0.001 if batch == 'b1' else 0.1] * int(calls)), flush=True)\n")
    with harness.blocks_from([sys.executable, str(fake), "ok"], {}, tmp_path, "b32", 30, "fake") as blocks:
        assert blocks(3) == [0.1, 0.1, 0.1] and blocks(1) == [0.1]
    assert "loading" in (tmp_path / "worker.log").read_text()

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the fake worker ended"):
        with harness.blocks_from([sys.executable, str(fake), "hang"], {}, tmp_path, "b1", 1.0, "fake"):
            pass
    assert time.monotonic() - started < 20  # killed by the watchdog, not waited for
