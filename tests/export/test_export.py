"""Exporting the default model for real, and what the gate and manifest promise about it."""
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from bert_recsys import settings
from bert_recsys.export.gate import DEFAULT_THRESHOLDS, Reference, evaluate, load_sts
from bert_recsys.contracts.manifest import SCHEMA_VERSION, Manifest, ManifestError, artifact_problems
from bert_recsys.export.runners import OrtRunner
from bert_recsys.contracts.digest import file_sha256
from bert_recsys.export.source import load_source

REPO = settings.REPO_ROOT


def run_cli(*args, **kwargs):
    """The export CLI without its retrieval task (~1 min more per run here; tested on its own below), as the
    session's export fixture gates: variants it left up to date stay so."""
    return subprocess.run([sys.executable, "-m", "bert_recsys.export", "--no-retrieval", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, **kwargs)


@pytest.mark.parametrize("variant", ["onnx-fp32", "onnx-fp16", "onnx-int8"])
def test_manifest_matches_the_artifact(export_dir, variant):
    directory = export_dir / variant
    manifest = Manifest.read(directory)
    assert artifact_problems(directory) == []
    artifact = directory / manifest.artifact.file
    assert manifest.artifact.sha256 == file_sha256(artifact)
    assert manifest.source_sha256 == load_source(settings.default_model_dir()).sha256
    graph = onnx.load(str(artifact), load_external_data=False).graph
    assert [i.name for i in graph.input] == [i["name"] for i in manifest.extra["inputs"]]
    assert [o.name for o in graph.output] == [o["name"] for o in manifest.extra["outputs"]]
    dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims[1] == manifest.encoder.dim == 384
    assert manifest.gate.passed is True
    assert manifest.extra["runtimes"]["onnxruntime"] and manifest.extra["opset"] == 17
    assert manifest.tokenizer_sha256 == file_sha256(export_dir / "tokenizer" / "tokenizer.json")
    # What the contract reads is what export wrote: a round trip changes no byte.
    assert manifest.text() == (directory / "manifest.json").read_text()


def test_a_manifest_of_another_schema_or_missing_a_field_is_refused_by_name(export_dir, tmp_path):
    data = json.loads((export_dir / "onnx-int8" / "manifest.json").read_text())
    for name, edit, message in (("future", {"schema_version": SCHEMA_VERSION + 1}, "schema_version"),
                                ("legacy", {"schema_version": None}, "schema_version"),
                                ("nodim", {"encoder": {"max_length": 256}}, "dim"),
                                ("badformat", {"format": "safetensors"}, "safetensors")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({**data, **edit}))
        with pytest.raises(ManifestError, match=message) as refused:
            Manifest.read(tmp_path / name)
        assert str(tmp_path / name) in str(refused.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text('{"schema_version": 1, "variant"')
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(tmp_path / "half")


def test_gate_figures_meet_the_defaults(export_dir):
    fp32 = Manifest.read(export_dir / "onnx-fp32").gate.figures
    fp16 = Manifest.read(export_dir / "onnx-fp16").gate.figures
    int8 = Manifest.read(export_dir / "onnx-int8").gate.figures
    assert fp32.cosine_min >= 0.9999 and fp16.cosine_min >= 0.999
    assert int8.cosine_mean >= 0.99
    if settings.STSB_DEV.exists():
        assert int8.spearman_ratio >= 0.99


def test_a_tampered_artifact_no_longer_matches_its_manifest(export_dir, tmp_path):
    import shutil

    copy = tmp_path / "onnx-int8"
    shutil.copytree(export_dir / "onnx-int8", copy)
    with open(copy / "model.onnx", "r+b") as handle:
        handle.seek(-100, 2)
        handle.write(b"\0" * 10)
    assert any("sha256" in p for p in artifact_problems(copy))


@pytest.fixture(scope="module")
def reference(export_dir):
    from transformers import AutoTokenizer

    from bert_recsys.export.onnx_export import load_torch_encoder
    from bert_recsys.export.runners import TorchRunner, embed_texts
    from bert_recsys.export.source import load_source

    source = load_source(settings.default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(export_dir / "tokenizer")
    embed = lambda runner, texts, label: embed_texts(runner, tokenizer, texts, source.max_length)  # noqa: E731
    torch_runner = TorchRunner(load_torch_encoder(source))
    built = Reference.build(embed, torch_runner, sts_path=None)
    built.torch_runner = torch_runner  # for tests that extend a copy of the reference
    return built


def test_gate_refuses_a_damaged_variant(export_dir, reference, tmp_path):
    """Noise on one attention weight: the model still runs, the gate must catch it."""
    model = onnx.load(str(export_dir / "onnx-fp32" / "model.onnx"))
    rng = np.random.default_rng(0)
    target = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight
    array = onnx.numpy_helper.to_array(target)
    target.CopyFrom(onnx.numpy_helper.from_array(array + rng.normal(0, 0.05, array.shape).astype(array.dtype), target.name))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    healthy = evaluate(OrtRunner(export_dir / "onnx-fp32" / "model.onnx"), reference, DEFAULT_THRESHOLDS["fp32"])
    broken = evaluate(OrtRunner(damaged), reference, DEFAULT_THRESHOLDS["fp32"])
    assert healthy.passed, healthy.failures
    assert not broken.passed and "min cosine" in broken.failures[0]


def test_cli_refuses_a_variant_below_its_threshold(export_dir, tmp_path):
    """End to end: an impossible threshold -> exit 1, figures printed, nothing where serving looks."""
    out = tmp_path / "export"
    result = run_cli("--out", str(out), "--variants", "onnx-int8", "--threshold", "int8.min_cosine=0.99999", "--sts", str(tmp_path / "none.csv"))
    assert result.returncode == 1, result.stderr
    assert "refused" in result.stdout and "min cosine" in result.stdout
    assert not (out / "onnx-int8").exists()
    refused = json.loads((out / "refused" / "onnx-int8" / "manifest.json").read_text())
    assert refused["gate"]["passed"] is False and refused["gate"]["figures"]["cosine_min"] < 0.99999


def test_ort_dynamic_int8_is_refused_for_batch_invariance_and_per_row_int8_passes(export_dir, reference, tmp_path):
    """ORT's dynamic INT8 scales activations per batch: a text's vector depends on its batch-mates, which the
    default gate refuses. The default INT8 (per-row) quantizes per token and passes with the same weights."""
    from bert_recsys.export.onnx_export import attention_nodes, ffn_output_matmuls, quantize_int8_dynamic, quantize_int8_per_row

    fp32 = export_dir / "onnx-fp32" / "model.onnx"
    quantize_int8_dynamic(fp32, tmp_path / "dynamic.onnx", ffn_output_matmuls(fp32, [0]))
    dynamic = evaluate(OrtRunner(tmp_path / "dynamic.onnx"), reference, DEFAULT_THRESHOLDS["int8"])
    assert not dynamic.passed and any("batch invariance" in f for f in dynamic.failures), dynamic.failures
    assert dynamic.figures.batch_invariance_min_cosine < 0.999
    # Every projection per-row, attention included (the MultiHeadAttention rewrite): still invariant.
    details = quantize_int8_per_row(fp32, tmp_path / "per-row.onnx", [])
    assert details["int8_nodes"] == 24 and len(attention_nodes(fp32)) == 6
    per_row = evaluate(OrtRunner(tmp_path / "per-row.onnx"), reference, DEFAULT_THRESHOLDS["int8"])
    assert per_row.figures.batch_invariance_min_cosine >= 0.99999, per_row.figures
    assert per_row.figures.cosine_mean >= 0.99


def test_the_default_int8_keeps_its_quality_on_the_half_of_sts_b_no_recipe_was_chosen_on(export_dir):
    """Recipes are chosen on the selection half of STS-B dev; the confirmation half is the figure to quote."""
    from bert_recsys.export.gate import sts_half

    figures = Manifest.read(export_dir / "onnx-int8").gate.figures
    if figures.spearman_ratio is None:
        pytest.skip("STS-B dev not available")
    assert figures.spearman_ratio_confirmation >= 0.9985 and figures.batch_invariance_min_cosine >= 0.999
    halves = [sts_half(a, b) for a, b, _ in load_sts(settings.STSB_DEV)]
    assert 0.45 < halves.count("confirmation") / len(halves) < 0.55


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "model directory not found"),
    (["--variants", "onnx-int4"], "unknown variant onnx-int4"),
    (["--threshold", "int8.cosine=0.5"], "unknown threshold"),
])
def test_cli_errors_are_clear(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_cli_refuses_a_non_bert_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    result = run_cli("--model", str(tmp_path))
    assert result.returncode == 2 and "only BERT" in result.stderr


def test_cli_refuses_an_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("--out", str(blocker / "out"), "--variants", "onnx-fp32")
    assert result.returncode == 2 and "not writable" in result.stderr


def test_named_tensorrt_variant_without_tensorrt_fails_clearly(export_dir):
    from bert_recsys.export.tensorrt_plan import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    result = run_cli("--variants", "onnx-fp32,trt-fp16")
    assert result.returncode == 1
    assert re.search(r"^trt-fp16 +skipped ", result.stdout, re.M) and "NGC" in result.stdout
    assert re.search(r"^onnx-fp32 +up-to-date ", result.stdout, re.M)


def test_the_torch_variant_records_the_code_it_was_gated_with(export_dir):
    """The served module is part of the recipe: editing encoders/torch_bert.py re-gates torch-fp32."""
    from bert_recsys.encoders import torch_bert
    from bert_recsys.export.torch_variant import MODULE

    directory = export_dir / "torch-fp32"
    manifest = Manifest.read(directory)
    assert artifact_problems(directory) == [] and manifest.artifact.file == "model.safetensors"
    assert manifest.gate.passed and manifest.gate.figures.cosine_min >= 0.9999
    assert manifest.extra["recipe"]["module_sha256"] == file_sha256(MODULE)
    assert manifest.extra["recipe"]["gate_device"] in ("cpu", "cuda")
    assert manifest.extra["details"]["torch"]["format"] == torch_bert.FORMAT
    model = torch_bert.load(directory / manifest.artifact.file)
    assert model.config.hidden == manifest.encoder.dim and model.config.pooling == manifest.encoder.pooling


def test_the_openvino_variant_carries_its_weights_file_and_passes_the_fp32_gate(export_dir, tmp_path):
    """ov-fp32: an IR whose weights (model.bin) are a companion of model.xml in the manifest, hashed like it."""
    import shutil

    directory = export_dir / "ov-fp32"
    manifest = Manifest.read(directory)
    assert [f.file for f in manifest.artifact.files] == ["model.xml", "model.bin"]
    assert artifact_problems(directory) == []
    assert manifest.artifact.companions[0].sha256 == file_sha256(directory / "model.bin")
    assert manifest.gate.passed and manifest.gate.figures.cosine_min >= 0.9999
    assert manifest.gate.figures.batch_invariance_min_cosine >= 0.999
    assert manifest.extra["details"]["openvino"]["inference_precision"] == "f32"
    assert manifest.extra["runtimes"]["openvino"] and manifest.extra["recipe"]["openvino"]
    # A copy whose weights changed no longer matches (the xml alone would).
    copy = shutil.copytree(directory, tmp_path / "ov-fp32")
    with open(copy / "model.bin", "r+b") as handle:
        handle.seek(4096)
        handle.write(b"\x00\x01\x02\x03")
    assert artifact_problems(copy) == ["model.bin sha256 differs from the manifest"]
    (copy / "model.bin").unlink()
    assert artifact_problems(copy) == [f"artifact {copy / 'model.bin'} is missing"]


def test_nncf_int8_keeps_pooling_and_the_chosen_layers_fp32_and_is_batch_invariant(export_dir, tmp_path):
    """ov-int8's quantizer on a small calibration set (the real export calibrates on 512 in-domain texts)."""
    import openvino as ov
    from transformers import AutoTokenizer

    from bert_recsys.export import openvino_variant
    from bert_recsys.export.calibration import calibration_batches
    from bert_recsys.export.gate import load_gate_sentences

    raw = export_dir / ".work" / "raw.onnx"
    assert raw.exists(), "the export fixture leaves the plain torch export in .work"
    tokenizer = AutoTokenizer.from_pretrained(export_dir / "tokenizer")
    sentences = load_gate_sentences()[0]
    calibration = calibration_batches(tokenizer, sentences[:48], 256, batch_size=16)  # the gate set: ~40 texts
    details = openvino_variant.quantize_int8(raw, tmp_path / "model.xml", calibration, fp32_layers=(0,))
    assert details["quantization"]["calibration_texts"] == len(sentences[:48]) and (tmp_path / "model.bin").exists()

    model = ov.Core().read_model(str(tmp_path / "model.xml"))
    quantized_inputs = {}
    for op in model.get_ordered_ops():
        sources = [op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())]
        quantized_inputs[op.get_friendly_name()] = "FakeQuantize" in sources
    assert sum(quantized_inputs.values()) >= 20, "the encoder's MatMuls are quantized"
    assert not any(q for name, q in quantized_inputs.items() if "/pool/" in name), "pooling stays FP32"
    assert not quantized_inputs["/bert/encoder/layer.0/output/dense/MatMul"]

    def quantized_upstream(value) -> bool:  # through the reshapes between a projection and the attention core
        node = value.get_node()
        while node.get_type_name() in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "FakeQuantize"

    attention = [op for op in model.get_ordered_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    assert attention and not any(quantized_upstream(op.input_value(i)) for op in attention for i in range(3)), \
        "query, key and value enter the attention core in FP32"
    assert quantized_inputs["/bert/encoder/layer.1/output/dense/MatMul"]

    int8 = openvino_variant.OpenVinoRunner(tmp_path / "model.xml", "int8")
    fp32 = openvino_variant.OpenVinoRunner(export_dir / "ov-fp32" / "model.xml", "fp32")
    from bert_recsys.export.runners import tokenize

    ids, mask = tokenize(tokenizer, sentences[:16], 256)
    together = int8(ids, mask)
    alone = np.concatenate([int8(*tokenize(tokenizer, [text], 256)) for text in sentences[:16]])
    assert float(np.min(np.sum(together * alone, axis=1))) >= 0.999  # static scales: no batch-mate effect
    # One padded position must not change a text's vector (INT8 query and key in the attention core did: 0.99786).
    padded, each_alone = [], []
    for text in sentences:
        ids_one, mask_one = tokenize(tokenizer, [text], 256)
        each_alone.append(int8(ids_one, mask_one))
        padded.append(int8(np.pad(ids_one, ((0, 0), (0, 1))), np.pad(mask_one, ((0, 0), (0, 1)))))
    assert float(np.min(np.sum(np.concatenate(padded) * np.concatenate(each_alone), axis=1))) >= 0.99999
    assert any("attention core" in kept for kept in details["quantization"]["fp32"])
    assert float(np.mean(np.sum(together * fp32(ids, mask), axis=1))) >= 0.95


def test_the_bf16_variants_are_built_only_where_the_cpu_computes_bf16(tmp_path, monkeypatch):
    """A CPU without AVX512-BF16 or AMX, as OpenVINO reports it: ov-bf16 and ov-int8-bf16 are skipped, saying why."""
    from bert_recsys.export import openvino_variant
    from bert_recsys.export.pipeline import ExportOptions, read_outcomes, run_export
    from bert_recsys.export.variants import VariantStatus, parse_variants

    monkeypatch.setattr(openvino_variant, "capabilities", lambda: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    options = ExportOptions(model_dir=settings.default_model_dir(), out_dir=tmp_path / "export",
                            variants=parse_variants("ov-bf16,ov-int8-bf16"), sts_path=settings.STSB_DEV)
    outcomes = run_export(options)
    assert [o.status for o in outcomes] == [VariantStatus.SKIPPED, VariantStatus.SKIPPED]
    assert all("no BF16" in o.detail and o.variant in o.detail for o in outcomes)
    assert not (tmp_path / "export" / "ov-bf16").exists() and not (tmp_path / "export" / "ov-int8-bf16").exists()
    recorded = read_outcomes(tmp_path / "export")
    assert recorded["ov-int8-bf16"]["status"] == "skipped" and "no BF16" in recorded["ov-int8-bf16"]["detail"]


def test_the_gate_measures_retrieval_on_scifact_as_a_second_task(export_dir, reference):
    """nDCG@10 on a SciFact-train subset, as a ratio to PyTorch FP32 (a small subset here; `make export` gates on
    300 queries and 1,000 abstracts)."""
    import copy

    from bert_recsys.export.retrieval import load_scifact

    if not (settings.SCIFACT_TRAIN / "qrels" / "train.tsv").exists():
        pytest.skip(f"SciFact train not found at {settings.SCIFACT_TRAIN}")
    small = load_scifact(settings.SCIFACT_TRAIN, queries=24, documents=96)
    assert (len(small.queries), len(small.documents)) == (24, 96)
    assert all(judged and max(judged) < 96 for judged in small.relevant)
    assert load_scifact(settings.SCIFACT_TRAIN, queries=24, documents=96).sha256 == small.sha256  # a fixed subset
    assert load_scifact(settings.SCIFACT_TRAIN, queries=24, documents=96, seed=1).sha256 != small.sha256

    ref = copy.copy(reference)
    ref.add_retrieval(small, reference.torch_runner)
    assert 0.3 < ref.retrieval_ndcg <= 1.0  # MiniLM finds most judged abstracts among 96
    # An impossible retrieval threshold: INT8 keeps nDCG@10 (>= 0.98 of FP32) and is refused for that alone.
    strict = DEFAULT_THRESHOLDS["int8"].with_overrides(retrieval_ndcg_ratio=1.5)
    int8 = evaluate(OrtRunner(export_dir / "onnx-int8" / "model.onnx"), ref, strict)
    figures = int8.figures
    assert figures.retrieval_ndcg10_fp32 == ref.retrieval_ndcg and figures.retrieval_set["queries"] == 24
    assert figures.retrieval_ndcg_ratio >= DEFAULT_THRESHOLDS["int8"].retrieval_ndcg_ratio
    assert [f for f in int8.failures] == [f"SciFact nDCG@10 ratio {figures.retrieval_ndcg_ratio:.5f} < 1.5"]
