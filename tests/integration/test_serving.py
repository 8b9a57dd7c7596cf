"""The real tritonserver, over HTTP and gRPC: correctness of `embed` and `score`, and the manifest."""
import hashlib
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.client.triton import InvalidRequest
from bert_recsys.export.gate import load_gate_sentences
from bert_recsys.export.runners import OrtRunner, embed_texts
from tests.conftest import client_for

SENTENCES = load_gate_sentences()[0]


def cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def hf_tokenizer(export_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export_dir / "tokenizer")


@pytest.mark.parametrize("variant", ["onnx-fp32", "onnx-int8"])
def test_embed_equals_the_variants_direct_onnx_runtime_output(triton, export_dir, hf_tokenizer, protocol, variant):
    server = triton(variant)
    with client_for(server, protocol) as client:
        served = client.embed(SENTENCES)
    direct = embed_texts(OrtRunner(export_dir / variant / "model.onnx"), hf_tokenizer, SENTENCES, 256)
    assert served.shape == (len(SENTENCES), 384) and served.dtype == np.float32
    assert cosines(served, direct).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_torch_runtime_on_the_cpu_equals_onnx_fp32_alone_in_a_batch_and_under_concurrency(triton):
    """`make serve RUNTIME=torch` on a machine without a GPU: the same torch code the GPU runs, in FP32."""
    protocol = "grpc"  # the runtime is behind the ensemble: the protocol changes nothing here
    torch_server, onnx_server = triton("torch-fp32", "torch"), triton("onnx-fp32")
    with client_for(torch_server, protocol) as client, client_for(onnx_server, protocol) as reference:
        served = client.embed(SENTENCES)
        expected = reference.embed(SENTENCES)
        alone = np.concatenate([client.embed([text]) for text in SENTENCES[:8]])
        with ThreadPoolExecutor(8) as pool:  # requests of different lengths, merged by the dynamic batcher
            concurrent = np.concatenate(list(pool.map(lambda text: client.embed([text]), SENTENCES)))
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(torch_server.server.grpc_url) as raw:
        config = raw.get_model_config(settings.SETTINGS.models.encoder, as_json=True)["config"]
    assert served.shape == (len(SENTENCES), 384) and served.dtype == np.float32
    assert cosines(served, expected).min() >= 0.9999
    assert cosines(alone, served[:8]).min() >= 0.9999
    assert cosines(concurrent, served).min() >= 0.9999
    assert config["parameters"]["runtime"]["string_value"] == "torch"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_openvino_and_onnx_runtime_serve_side_by_side_as_two_encoder_versions(export_dir, tmp_path):
    """The embedded runtime picks the engine per encoder version from its manifest: ONNX Runtime for version 1
    (onnx-fp32), OpenVINO for version 2 (ov-fp32). Both FP32: the same vectors, alone, batched or concurrent."""
    from dataclasses import replace

    from bert_recsys.client.triton import TritonClient
    from bert_recsys.model_repository.render import write_generation
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    path = write_generation(settings.SETTINGS, export_dir / "tokenizer", {1: export_dir / "onnx-fp32",
                                                                         2: export_dir / "ov-fp32"},
                            "embedded", tmp_path / "repository", stable=1)
    assert sorted(p.name for p in (path / "encoder" / "2").iterdir()) == [
        "manifest.json", "model.bin", "model.py", "model.xml", "tokenizer.json", "tokenizer_model.py"]  # takes text
    server_settings = on_free_ports(settings.SETTINGS.server, admin_key="")
    with TritonServer(path, server_settings, log_file=tmp_path / "triton.log"):
        with TritonClient(server_settings.grpc_url, settings=replace(settings.SETTINGS, server=server_settings)) as client:
            onnx = client.embed(SENTENCES, encoder_version=1)
            openvino = client.embed(SENTENCES, encoder_version=2)
            alone = np.concatenate([client.embed([text], encoder_version=2) for text in SENTENCES[:8]])
            with ThreadPoolExecutor(8) as pool:
                concurrent = np.concatenate(list(pool.map(lambda t: client.embed([t], encoder_version=2), SENTENCES)))
            variants = {v: client.encoder_info(v)["export_variant"] for v in (1, 2)}
    assert variants == {1: "onnx-fp32", 2: "ov-fp32"}
    assert openvino.shape == onnx.shape == (len(SENTENCES), 384)
    assert cosines(openvino, onnx).min() >= 0.9999
    assert cosines(alone, openvino[:8]).min() >= 0.9999 and cosines(concurrent, openvino).min() >= 0.9999


def test_the_encoder_gives_the_same_vectors_whatever_padding_it_is_sent(triton, export_dir, hf_tokenizer):
    """The embedded encoder drops the columns no row attends to (the tokenizer pads to a multiple of 8 for the
    batcher): a text padded to 64 columns, a batch of two lengths and the bare text all give the bare vectors."""
    import tritonclient.grpc as grpcclient

    from bert_recsys.export.runners import tokenize

    t = settings.SETTINGS.tensors
    texts = ["a short text", "a somewhat longer text, with a clause and a few more words in it"]
    ids, mask = tokenize(hf_tokenizer, texts, 256)
    direct = OrtRunner(export_dir / "onnx-fp32" / "model.onnx")

    def served(raw, ids, mask):
        inputs = [grpcclient.InferInput(t.input_ids, list(ids.shape), "INT64"),
                  grpcclient.InferInput(t.attention_mask, list(mask.shape), "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(mask)
        return raw.infer(settings.SETTINGS.models.encoder, inputs).as_numpy(t.encoder_output)

    def padded(array, width):
        return np.pad(array, ((0, 0), (0, width - array.shape[1])))

    with grpcclient.InferenceServerClient(triton("onnx-fp32").server.grpc_url) as raw:
        short = int(mask[0].sum())
        alone = served(raw, ids[:1, :short], mask[:1, :short])
        alone_padded = served(raw, padded(ids[:1, :short], 64), padded(mask[:1, :short], 64))
        batch_padded = served(raw, padded(ids, 64), padded(mask, 64))
    expected = direct(ids, mask)
    assert cosines(alone, expected[:1]).min() >= 0.99999
    assert cosines(alone_padded, expected[:1]).min() >= 0.99999
    assert cosines(batch_padded, expected).min() >= 0.99999


def test_the_encoder_takes_the_text_itself_and_agrees_with_the_tokenizer_models_ids(triton):
    """ENCODER_TOKENIZES (the default): `embed` is the encoder alone, sent TEXT. The same encoder still takes token
    ids (here the tokenizer model's): both give the same vectors, alone and in concurrent requests of both kinds
    that the batcher may merge; bad text fails its own request only; a request with half the ids is a clear error."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    t, m = settings.SETTINGS.tensors, settings.SETTINGS.models
    texts = SENTENCES[:16]

    def text_input(batch):
        tensor = grpcclient.InferInput(t.text, [len(batch), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[x if isinstance(x, bytes) else x.encode()] for x in batch], dtype=object))
        return tensor

    def id_inputs(raw, batch):
        tokens = raw.infer(m.tokenizer, [text_input(batch)])
        inputs = []
        for name in (t.input_ids, t.attention_mask):
            array = tokens.as_numpy(name)
            inputs.append(grpcclient.InferInput(name, list(array.shape), "INT64"))
            inputs[-1].set_data_from_numpy(array)
        return inputs

    with grpcclient.InferenceServerClient(triton("onnx-int8").server.grpc_url) as raw:
        steps = raw.get_model_config(m.embed, as_json=True)["config"]["ensemble_scheduling"]["step"]
        by_text = raw.infer(m.encoder, [text_input(texts)]).as_numpy(t.encoder_output)
        by_ids = raw.infer(m.encoder, id_inputs(raw, texts)).as_numpy(t.encoder_output)
        embedded = raw.infer(m.embed, [text_input(texts)]).as_numpy(t.embedding)

        def one(index):
            inputs = [text_input([texts[index]])] if index % 2 else id_inputs(raw, [texts[index]])
            return raw.infer(m.encoder, inputs).as_numpy(t.encoder_output)

        with ThreadPoolExecutor(8) as pool:
            mixed = np.concatenate(list(pool.map(one, range(len(texts)))))

        def bad_text():
            with pytest.raises(InferenceServerException, match="not valid UTF-8"):
                raw.infer(m.encoder, [text_input([b"\xff\xfe broken"])])

        with ThreadPoolExecutor(4) as pool:  # bad text beside good requests: only its own fails
            futures = [pool.submit(bad_text)] + [pool.submit(one, i) for i in range(3)]
            good = [f.result() for f in futures][1:]
        half = id_inputs(raw, texts[:1])[1:]  # the attention mask alone
        with pytest.raises(InferenceServerException, match="send TEXT or input_ids and attention_mask"):
            raw.infer(m.encoder, half)
        still = raw.infer(m.embed, [text_input(["still serving"])]).as_numpy(t.embedding)
    assert [step["model_name"] for step in steps] == [m.encoder]
    assert cosines(by_text, by_ids).min() >= 0.99999 and cosines(embedded, by_ids).min() >= 0.99999
    assert cosines(mixed, by_ids).min() >= 0.9999
    assert cosines(np.concatenate(good), by_ids[:3]).min() >= 0.9999 and still.shape == (1, 384)


def test_torch_encoder_refuses_mismatched_inputs_and_stays_up(triton):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = triton("torch-fp32", "torch")
    t = settings.SETTINGS.tensors
    with grpcclient.InferenceServerClient(server.server.grpc_url) as raw:
        inputs = [grpcclient.InferInput(t.input_ids, [1, 8], "INT64"), grpcclient.InferInput(t.attention_mask, [1, 4], "INT64")]
        inputs[0].set_data_from_numpy(np.ones((1, 8), np.int64))
        inputs[1].set_data_from_numpy(np.ones((1, 4), np.int64))
        with pytest.raises(InferenceServerException, match="differ"):
            raw.infer(settings.SETTINGS.models.encoder, inputs)
    with client_for(server, "grpc") as client:
        assert client.embed(["still serving"]).shape == (1, 384)


def test_fp32_embed_equals_sentence_transformers(triton, protocol):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(settings.default_model_dir()), device="cpu")
    expected = model.encode(SENTENCES, normalize_embeddings=True, batch_size=16)
    with client_for(triton("onnx-fp32"), protocol) as client:
        served = client.embed(SENTENCES)
    assert cosines(served, expected).min() >= 0.9999


def test_score_ranks_candidates_by_cosine_and_any_output_subset_works(triton, protocol):
    texts = ["a man playing guitar", "stock market news"]
    with client_for(triton("onnx-int8"), protocol) as client:
        items = client.embed(["A man is playing a guitar.", "Shares fell sharply on Wall Street.", "A cat sleeps."])
        candidates = np.stack([items, items])  # [2 queries, 3 candidates, D]
        both = client.score(texts, candidates)
        queries = client.embed(texts)
        scores_only = client.score(texts, candidates, outputs=["SCORES"])
        query_only = client.score(texts, candidates, outputs=["QUERY_EMBEDDING"])
    np.testing.assert_allclose(both["SCORES"], np.einsum("bkd,bd->bk", candidates, queries), atol=1e-5)
    assert both["SCORES"].argmax(axis=1).tolist() == [0, 1]
    assert set(scores_only) == {"SCORES"} and set(query_only) == {"QUERY_EMBEDDING"}
    np.testing.assert_allclose(scores_only["SCORES"], both["SCORES"], atol=1e-6)
    np.testing.assert_allclose(query_only["QUERY_EMBEDDING"], queries, atol=1e-6)


# Every served variant is batch-invariant (the gate refuses one below 0.999): a text alone and the same text
# merged by the dynamic batcher with others get the same vector. Rows mixed up by batching would give ~0.
@pytest.mark.parametrize("variant, min_cosine", [("onnx-fp32", 0.9999), ("onnx-int8", 0.999)])
def test_concurrent_requests_batch_dynamically(triton, export_dir, variant, min_cosine):
    """FP32: batching changes nothing. Dynamic INT8: vectors move with batch-mates, within the bound above."""
    server = triton(variant)
    texts = [[s] for s in SENTENCES[:32]]
    with client_for(server, "grpc") as client:
        alone = np.concatenate([client.embed(t) for t in texts])
        with ThreadPoolExecutor(8) as pool:
            together = np.concatenate(list(pool.map(client.embed, texts)))
    figures = json.loads((export_dir / variant / "manifest.json").read_text())["gate"]["figures"]
    assert figures["batch_invariance_min_cosine"] >= min_cosine
    assert cosines(alone, together).min() >= min_cosine


@pytest.mark.parametrize("text, message", [
    (b"\xff\xfe broken", "not valid UTF-8"),
    (b"", "empty or only whitespace"),
    (b"   ", "empty or only whitespace"),
    ("x" * (settings.SETTINGS.max_text_chars + 1), "the limit is"),
    ("word " * 200_000, "the limit is"),  # 1 MB
])
def test_bad_text_is_a_clear_invalid_argument_and_the_server_stays_up(triton, protocol, text, message):
    server = triton("onnx-int8")
    with client_for(server, protocol) as client:
        raw = text if isinstance(text, bytes) else text.encode()
        tensor = client._input("TEXT", np.array([[raw]], dtype=object), "BYTES")
        with pytest.raises(InvalidRequest, match=message):
            client._infer("embed", [tensor], ["EMBEDDING"])
        assert client.embed(["still serving"]).shape == (1, 384)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_candidates_are_refused(triton, protocol, bad):
    with client_for(triton("onnx-int8"), protocol) as client:
        candidates = np.ones((1, 2, 384), dtype=np.float32)
        candidates[0, 1, 5] = bad
        with pytest.raises(InvalidRequest, match="NaN or infinite"):
            client.score(["query"], candidates)
        assert client.score(["still serving"], np.ones((1, 2, 384), dtype=np.float32))["SCORES"].shape == (1, 2)


def _text(client, rows: int = 1, per_row: int = 1):
    return client._input("TEXT", np.array([[b"a sentence"] * per_row] * rows, dtype=object), "BYTES")


# Each malformed request: (model, version, inputs builder, outputs, what Triton's error must say).
CANDIDATES = lambda c: c._input("CANDIDATES", np.ones((1, 2, 384), np.float32), "FP32")  # noqa: E731
MALFORMED = {
    "wrong dtype": ("embed", "", lambda c: [c._input("TEXT", np.ones((1, 1), np.float32), "FP32")], ["EMBEDDING"], "data-type"),
    "wrong shape": ("embed", "", lambda c: [_text(c, per_row=2)], ["EMBEDDING"], "unexpected shape"),
    "batch > max": ("embed", "", lambda c: [_text(c, rows=settings.SETTINGS.batching.max_batch_size + 1)], ["EMBEDDING"],
                    "batch-size must be <= 64"),
    "unknown model": ("embed_nonexistent", "", lambda c: [_text(c)], ["EMBEDDING"], "unknown model"),
    "unknown version": ("embed", "7", lambda c: [_text(c)], ["EMBEDDING"], "version 7 is not found"),
    "missing input": ("score", "", lambda c: [_text(c)], ["SCORES"], "missing required input"),
    "unknown output": ("score", "", lambda c: [_text(c), CANDIDATES(c)], ["EMBEDDING"], "unexpected inference output"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_get_a_clear_error_and_the_server_stays_up(triton, protocol, case):
    model, version, inputs, outputs, message = MALFORMED[case]
    with client_for(triton("onnx-int8"), protocol) as client:
        with pytest.raises(InvalidRequest, match=message) as refused:
            client._infer(model, inputs(client), outputs, version)
        print(f"{case} ({protocol}): {refused.value}")
        assert client.embed(["still serving"]).shape == (1, 384)


def test_serving_export_is_visible_in_the_encoder_config(triton, export_dir, protocol):
    manifest_text = (export_dir / "onnx-int8" / "manifest.json").read_text()
    with client_for(triton("onnx-int8"), protocol) as client:
        info = client.encoder_info()
    assert info["export_manifest_sha256"] == hashlib.sha256(manifest_text.encode()).hexdigest()
    assert info["export_variant"] == "onnx-int8"
    assert info["export_artifact_sha256"] == json.loads(manifest_text)["artifact"]["sha256"]


def test_model_control_needs_the_admin_key(triton):
    server = triton("onnx-int8")
    url = f"http://{server.server.http_url}/v2/repository/index"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b"{}"), timeout=5)
    assert denied.value.code in (401, 403)
    request = urllib.request.Request(url, method="POST", data=b"{}", headers=server.admin_headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        names = {m["name"] for m in json.loads(response.read())}
    assert {"embed", "score", "tokenizer", "encoder", "similarity"} <= names


def test_server_binds_to_loopback_only(triton):
    import socket

    server = triton("onnx-int8")
    assert server.server.host == "127.0.0.1"
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1", "127.0.1.1"}
    for address in addresses:
        with socket.socket() as probe:
            probe.settimeout(1)
            assert probe.connect_ex((address, server.server.http_port)) != 0


def test_every_metric_the_dashboards_and_autoscaling_query_is_one_triton_exports(triton):
    """PromQL in the prometheus-adapter values (HPA), the Grafana dashboards and the recording and alert rules
    names only metrics that tritonserver 2.51 really exports on :8002 (read from the live server after some
    traffic); GPU metrics only where the server sees a GPU."""
    import re

    import yaml
    from monitoring_queries import GPU_METRICS, dashboard_queries, rule_queries

    server = triton("onnx-int8")
    with client_for(server, "grpc") as client:
        client.embed(["a few requests", "so every per-model family is there"])
        client.score(["a profile"], np.ones((1, 3, 384), dtype=np.float32) / np.sqrt(384))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as response:
        exported = set(re.findall(r"^(nv_[a-z_]+)", response.read().decode(), re.M))
    docker = settings.REPO_ROOT / "docker"
    values = yaml.safe_load((docker / "k8s" / "helm" / "prometheus-adapter-values.yaml").read_text())
    queries = [r[k] for r in values["rules"]["custom"] for k in ("seriesQuery", "metricsQuery")]
    queries += [expr for _, _, expr in dashboard_queries()] + [expr for _, expr in rule_queries()]
    used = {name for q in queries for name in re.findall(r"\bnv_[a-z_]+", q)}
    assert "nv_inference_request_summary_us" in used and "nv_inference_queue_duration_us" in used
    assert used - exported - GPU_METRICS == set(), f"not exported by tritonserver: {used - exported - GPU_METRICS}"


def test_the_readmes_first_calls_work_as_written(triton):
    """The README's curl commands for `embed` and `score`, and its Python example, run against a real server."""
    import re
    import subprocess

    server = triton("onnx-fp32")
    readme = (settings.REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## First calls"):readme.index("## Public contract")]
    shell, python = re.findall(r"```bash\n(.*?)```", section, re.S)[0], re.findall(r"```python\n(.*?)```", section, re.S)[0]
    shell = shell.replace("localhost:8000", server.server.http_url)
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    decoder, answers, text = json.JSONDecoder(), [], result.stdout.strip()
    while text:
        answer, end = decoder.raw_decode(text)
        answers.append(answer), (text := text[end:].strip())
    embed, score = ({o["name"]: o for o in a["outputs"]} for a in answers)
    assert embed["EMBEDDING"]["shape"] == [2, 384]
    assert score["SCORES"]["shape"] == [1, 2] and score["QUERY_EMBEDDING"]["shape"] == [1, 384]
    query = np.array(score["QUERY_EMBEDDING"]["data"])
    assert np.allclose(score["SCORES"]["data"], [query[0], query[1]], atol=1e-5)  # cosines with unit axes 0 and 1
    python = python.replace('"127.0.0.1:8001"', repr(server.server.grpc_url))
    namespace: dict = {}
    exec(compile(python, "README.md", "exec"), namespace)
    assert namespace["vectors"].shape == (2, 384) and namespace["scores"].shape == (1, 2)
    assert np.allclose(namespace["scores"][0], namespace["vectors"] @ namespace["vectors"][1], atol=1e-4)


def test_the_benchmarks_one_serve_variant_renders_serves_on_free_ports_and_stops(export_dir, tmp_path):
    """bench/served.py: what every benchmark serves through, written once."""
    from bench.served import serve_variant
    from bert_recsys.client.triton import TritonClient

    edited = []
    with serve_variant("onnx-int8", tmp_path, admin_key="bench-key", edit=edited.append) as server:
        s = server.server
        assert edited == [tmp_path / "repository"] and (tmp_path / "repository" / "embed").is_dir()
        assert s.host == "127.0.0.1" and s.admin_key == "bench-key"
        assert {s.http_port, s.grpc_port, s.metrics_port}.isdisjoint({8000, 8001, 8002})
        with TritonClient(s.grpc_url, settings=settings.Settings(server=s)) as client:
            vectors = client.embed(["a heist film", "space opera"])
        assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
        process = server.process
    assert process.poll() is not None  # stopped on leaving the block
    assert (tmp_path / "triton.log").is_file()
