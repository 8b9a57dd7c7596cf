"""The rendered repository, checked against Triton's protobuf schema and the ensemble rules."""
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from bert_recsys import settings
from bert_recsys.contracts.manifest import SCHEMA_VERSION, Manifest
from bert_recsys.model_repository.render import MODELS_SOURCE, render_configs, to_pbtxt

S = settings.SETTINGS


def manifest(variant="onnx-int8", fmt="onnx", precision="int8", dim=384, file_sha256="c" * 64):
    return Manifest.from_json({
        "schema_version": SCHEMA_VERSION, "variant": variant, "format": fmt, "precision": precision,
        "encoder": {"dim": dim, "max_length": 256},
        "artifact": {"file": {"onnx": "model.onnx", "torch": "model.safetensors", "openvino": "model.xml"}.get(fmt, "model.plan"),
                     "sha256": "a" * 64, "bytes": 1,
                     **({"companions": [{"file": "model.bin", "sha256": "e" * 64, "bytes": 2}]} if fmt == "openvino" else {})},
        "gate": {"passed": True}, "tokenizer": {"sha256": "d" * 64},
        "source": {"sha256": "b" * 64}, "exported_at": "2026-01-01T00:00:00Z",
    }, file_sha256=file_sha256)


CASES = [
    ("embedded", manifest("onnx-fp32", "onnx", "fp32")),
    ("embedded", manifest("onnx-int8", "onnx", "int8")),
    ("native", manifest("onnx-fp16", "onnx", "fp16")),
    ("native", manifest("onnx-int8", "onnx", "int8")),
    ("native", manifest("trt-fp16", "tensorrt_plan", "fp16")),
    ("native", manifest("trt-int8", "tensorrt_plan", "int8")),
    ("torch", manifest("torch-fp16", "torch", "fp16")),
    ("torch", manifest("torch-fp32", "torch", "fp32")),
    ("embedded", manifest("ov-int8", "openvino", "int8")),
    ("native", manifest("ov-fp32", "openvino", "fp32")),
    ("native", manifest("ov-bf16", "openvino", "bf16")),
]


@pytest.mark.parametrize("runtime, man", CASES, ids=[f"{r}-{m.variant}" for r, m in CASES])
def test_every_config_round_trips_through_the_schema(runtime, man):
    configs = render_configs(S, man, runtime)
    assert set(configs) == {"tokenizer", "encoder", "similarity", "embed", "score", "embed_v1", "score_v1"}
    for config in configs.values():
        parsed = text_format.Parse(to_pbtxt(config), mc.ModelConfig())
        assert parsed == config
        assert parsed.max_batch_size >= 64


@pytest.mark.parametrize("runtime, man", CASES, ids=[f"{r}-{m.variant}" for r, m in CASES])
def test_ensembles_are_wired_to_real_tensors_and_never_deadlock(runtime, man):
    configs = render_configs(S, man, runtime)
    for name in ("embed", "score", "embed_v1", "score_v1"):
        ensemble = configs[name]
        available = {t.name for t in ensemble.input}
        produced_by_step = {}
        for index, step in enumerate(ensemble.ensemble_scheduling.step):
            model = configs[step.model_name]
            required = {t.name for t in model.input if not t.optional}
            assert required <= set(step.input_map) <= {t.name for t in model.input}, (name, step.model_name)
            if step.model_name == "encoder":  # its inputs are all optional when it takes text: exactly one kind
                assert set(step.input_map) in ({"TEXT"}, {"input_ids", "attention_mask"}), (name, dict(step.input_map))
            assert set(step.input_map.values()) <= available, (name, step.model_name)
            assert set(step.output_map) <= {t.name for t in model.output}
            for tensor in step.output_map.values():
                produced_by_step[tensor] = index
            available |= set(step.output_map.values())
        consumed = {v for step in ensemble.ensemble_scheduling.step for v in step.input_map.values()}
        for output in ensemble.output:
            assert output.name in produced_by_step, (name, output.name)
            # An ensemble output that also feeds a later step can deadlock when a client asks for a subset.
            assert output.name not in consumed, (name, output.name)


def test_embedded_encoder_runs_onnx_in_the_python_backend():
    encoder = render_configs(S, manifest(), "embedded")["encoder"]
    assert encoder.backend == "python" and not encoder.platform
    assert encoder.parameters["export_manifest_sha256"].string_value == "c" * 64
    assert encoder.parameters["export_variant"].string_value == "onnx-int8"
    assert encoder.output[0].dims == [384]
    # The largest shape is warmed too (max batch x the manifest's max length): peak memory is reached at load.
    shapes = [(w.batch_size, list(w.inputs["input_ids"].dims)) for w in encoder.model_warmup]
    assert shapes == [(1, [16]), (8, [128]), (S.batching.max_batch_size, [manifest().encoder.max_length])]


def test_native_encoders_pick_the_backend_and_accelerator():
    fp16 = render_configs(S, manifest("onnx-fp16", "onnx", "fp16"), "native")["encoder"]
    assert fp16.platform == "onnxruntime_onnx"
    assert fp16.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    accelerator = fp16.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    int8 = render_configs(S, manifest("onnx-int8", "onnx", "int8"), "native")["encoder"]
    assert int8.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    plan = render_configs(S, manifest("trt-int8", "tensorrt_plan", "int8"), "native")["encoder"]
    assert plan.platform == "tensorrt_plan" and plan.default_model_filename == "model.plan"


def test_openvino_ir_runs_in_the_python_backend_or_tritons_openvino_backend():
    embedded = render_configs(S, manifest("ov-int8", "openvino", "int8"), "embedded")["encoder"]
    assert embedded.backend == "python" and embedded.parameters["runtime"].string_value == "embedded"
    native = render_configs(S, manifest("ov-fp32", "openvino", "fp32"), "native")["encoder"]
    assert (native.backend, native.default_model_filename, native.platform) == ("openvino", "model.xml", "")
    assert native.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    params = {k: v.string_value for k, v in native.parameters.items()}
    assert params["PERFORMANCE_HINT"] == "LATENCY" and params["NUM_STREAMS"] == "1" and "HINT_BF16" not in params
    bf16 = render_configs(S, manifest("ov-bf16", "openvino", "bf16"), "native")["encoder"]
    assert bf16.parameters["HINT_BF16"].string_value == "YES"
    # INT8 whose unquantized ops the export gated in BF16: the manifest's recorded inference precision decides.
    int8_bf16 = manifest("ov-int8-bf16", "openvino", "int8")
    int8_bf16.extra["details"] = {"openvino": {"inference_precision": "bf16"}}
    assert int8_bf16.openvino_precision == "bf16" and manifest("ov-int8", "openvino", "int8").openvino_precision == "f32"
    assert manifest("onnx-int8").openvino_precision is None
    hinted = render_configs(S, int8_bf16, "native")["encoder"]
    assert hinted.parameters["HINT_BF16"].string_value == "YES"


def test_the_openvino_backend_cannot_mix_bf16_and_other_versions():
    from bert_recsys.model_repository.render import render_generation

    versions = {1: manifest("ov-fp32", "openvino", "fp32"), 2: manifest("ov-bf16", "openvino", "bf16")}
    with pytest.raises(ValueError, match="precision hint is per model"):
        render_generation(S, versions, "native", stable=1)
    mixed = {1: manifest("onnx-int8", "onnx", "int8"), 2: manifest("ov-int8", "openvino", "int8")}
    assert render_generation(S, mixed, "embedded", stable=1)["encoder"].backend == "python"  # engine per version
    with pytest.raises(ValueError, match="one backend for all its versions"):
        render_generation(S, mixed, "native", stable=1)


def test_embedded_runtime_refuses_a_tensorrt_plan():
    with pytest.raises(ValueError, match="--runtime native"):
        render_configs(S, manifest("trt-fp16", "tensorrt_plan", "fp16"), "embedded")


@pytest.mark.parametrize("runtime, variant, fmt, fits", [
    ("torch", "onnx-fp32", "onnx", "embedded or native"),
    ("embedded", "torch-fp16", "torch", "torch"),
    ("native", "torch-fp32", "torch", "torch"),
])
def test_each_runtime_serves_only_its_formats_and_names_the_one_that_fits(runtime, variant, fmt, fits):
    with pytest.raises(ValueError, match=f"use --runtime {fits}"):
        render_configs(S, manifest(variant, fmt, variant[-4:]), runtime)


@pytest.mark.parametrize("device, kind", [("gpu", mc.ModelInstanceGroup.KIND_GPU),
                                          ("cpu", mc.ModelInstanceGroup.KIND_CPU)])
def test_torch_encoder_is_a_python_model_on_the_device_asked_for(device, kind):
    from dataclasses import replace

    settings_ = replace(S, instances=replace(S.instances, encoder_device=device, cuda_graphs=False))
    encoder = render_configs(settings_, manifest("torch-fp16", "torch", "fp16"), "torch")["encoder"]
    assert encoder.backend == "python" and encoder.instance_group[0].kind == kind
    params = {k: v.string_value for k, v in encoder.parameters.items()}
    assert params["runtime"] == "torch" and params["artifact"] == "model.safetensors"
    assert params["cuda_graphs"] == "false" and params["max_length"] == "256"


def test_an_unknown_encoder_device_is_refused():
    from dataclasses import replace

    with pytest.raises(ValueError, match="ENCODER_DEVICE"):
        replace(S.instances, encoder_device="tpu")


@pytest.mark.parametrize("runtime, man", CASES, ids=[f"{r}-{m.variant}" for r, m in CASES])
def test_the_runtime_a_config_declares_is_the_one_it_was_rendered_for(runtime, man):
    from bert_recsys.contracts.runtime import Runtime

    encoder = render_configs(S, man, runtime)["encoder"]
    declared = encoder.parameters["runtime"].string_value
    assert Runtime.of_encoder_config(encoder.backend, encoder.platform, declared) == Runtime(runtime)
    # Configs rendered before the parameter existed: the Python backend was always embedded.
    assert Runtime.of_encoder_config("python", "") == Runtime.EMBEDDED


def test_dims_come_from_the_manifest_not_from_code():
    configs = render_configs(S, manifest(dim=768), "embedded")
    assert configs["embed"].output[0].dims == [768]
    assert list(configs["score"].input[1].dims) == [-1, 768]
    assert configs["similarity"].input[0].dims == [768]


@pytest.mark.parametrize("runtime, tokenizes", [("embedded", True), ("embedded", False), ("native", True)])
def test_queue_policy_rejects_when_bounded_at_the_tokenizer_which_then_stays_the_entry_step(runtime, tokenizes):
    """Backpressure was measured on the tokenizer's two instances (with one, Triton 2.51 stalled accepted requests
    once it rejected): with a bounded queue the ensembles keep the tokenizer as their entry step, even where the
    encoder would otherwise take the text."""
    from dataclasses import replace

    bounded = replace(S, batching=replace(S.batching, max_queue_size=16, queue_timeout_us=20000),
                      instances=replace(S.instances, encoder_tokenizes=tokenizes))
    configs = render_configs(bounded, manifest(), runtime)
    assert configs["embed"].ensemble_scheduling.step[0].model_name == "tokenizer"
    assert "TEXT" not in {t.name for t in configs["encoder"].input}
    policy = configs["tokenizer"].dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 16 and policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert policy.default_timeout_microseconds == 20000
    # Only the entry step rejects: a later rejection would waste the work done before it.
    for later in ("encoder", "similarity"):
        assert not configs[later].dynamic_batching.HasField("default_queue_policy")
    unbounded = render_configs(replace(bounded, batching=S.batching), manifest(), runtime)
    takes_text = runtime == "embedded" and tokenizes
    assert ("TEXT" in {t.name for t in unbounded["encoder"].input}) is takes_text
    assert not unbounded["encoder"].dynamic_batching.HasField("default_queue_policy")


@pytest.mark.parametrize("tokenizes", [True, False])
def test_the_embedded_encoder_takes_text_unless_told_not_to(tokenizes):
    """ENCODER_TOKENIZES (default on): the embedded encoder gets TEXT, the tokenizer's parameters, and the ensembles
    skip the tokenizer step; each of its inputs is then optional (a request brings TEXT or both id tensors)."""
    from dataclasses import replace

    serving = replace(S, instances=replace(S.instances, encoder_tokenizes=tokenizes))
    configs = render_configs(serving, manifest(), "embedded")
    encoder = configs["encoder"]
    inputs = {t.name: t.optional for t in encoder.input}
    params = {k: v.string_value for k, v in encoder.parameters.items()}
    steps = {name: [s.model_name for s in configs[name].ensemble_scheduling.step] for name in ("embed", "score", "embed_v1")}
    if tokenizes:
        assert inputs == {"TEXT": True, "input_ids": True, "attention_mask": True}
        tokenizer = {k: v.string_value for k, v in configs["tokenizer"].parameters.items()}
        for key in ("max_length", "pad_to_multiple_of", "max_text_chars", "text_input"):
            assert params[key] == tokenizer[key], key
        assert steps == {"embed": ["encoder"], "score": ["encoder", "similarity"], "embed_v1": ["encoder"]}
        assert dict(configs["embed"].ensemble_scheduling.step[0].input_map) == {"TEXT": "TEXT"}
    else:
        assert inputs == {"input_ids": False, "attention_mask": False} and "text_input" not in params
        assert steps == {"embed": ["tokenizer", "encoder"], "score": ["tokenizer", "encoder", "similarity"],
                         "embed_v1": ["tokenizer", "encoder"]}
    # Token ids in warm-up either way: the warm-up exercises the engine's shapes.
    assert {name for w in encoder.model_warmup for name in w.inputs} == {"input_ids", "attention_mask"}
    native = render_configs(serving, manifest("ov-fp32", "openvino", "fp32"), "native")
    assert [s.model_name for s in native["embed"].ensemble_scheduling.step] == ["tokenizer", "encoder"]
    assert {t.name for t in native["encoder"].input} == {"input_ids", "attention_mask"}


def test_a_two_version_generation_pins_each_ensemble_to_its_own_version():
    from bert_recsys.model_repository.render import render_generation

    versions = {1: manifest("onnx-int8", file_sha256="1" * 64), 2: manifest("onnx-fp32", "onnx", "fp32", file_sha256="2" * 64)}
    configs = render_generation(S, versions, "embedded", stable=1)
    assert set(configs) == {"tokenizer", "encoder", "similarity", "embed", "score", "embed_v1", "score_v1",
                            "embed_v2", "score_v2"}
    encoder = configs["encoder"]
    assert list(encoder.version_policy.specific.versions) == [1, 2]
    assert encoder.parameters["export_manifest_sha256"].string_value == "1" * 64  # what `embed` serves
    assert encoder.parameters["export_v2_variant"].string_value == "onnx-fp32"

    def pinned(name):
        return {s.model_name: s.model_version for s in configs[name].ensemble_scheduling.step}["encoder"]

    assert [pinned(n) for n in ("embed", "score", "embed_v1", "score_v1", "embed_v2", "score_v2")] == [1, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="stable version 3"):
        render_generation(S, versions, "embedded", stable=3)


def test_versions_of_different_shapes_cannot_share_a_generation():
    from bert_recsys.model_repository.render import render_generation

    versions = {1: manifest(dim=384), 2: manifest(dim=768)}
    with pytest.raises(ValueError, match="disagree"):
        render_generation(S, versions, "embedded", stable=1)


def test_two_families_share_one_repository_and_each_is_rebuilt_or_removed_alone(tmp_path):
    """The general family (embed, score) and the recommendation encoder (rec_embed, rec_score) side by side:
    building one keeps the other's models as they are; the rec family can be removed, the general one cannot."""
    import json

    from bert_recsys.model_repository.render import build_repository, remove_family

    def export(root, sha):
        variant = root / "onnx-int8"
        variant.mkdir(parents=True)
        (variant / "model.onnx").write_bytes(b"onnx")
        (variant / "manifest.json").write_text(json.dumps({
            "schema_version": SCHEMA_VERSION, "variant": "onnx-int8", "format": "onnx", "precision": "int8",
            "encoder": {"dim": 384, "max_length": 256},
            "artifact": {"file": "model.onnx", "sha256": sha, "bytes": 4},
            "gate": {"passed": True}, "tokenizer": {"sha256": "d" * 64}, "source": {"sha256": "b" * 64},
            "exported_at": "2026-01-01T00:00:00Z"}))
        (root / "tokenizer").mkdir()
        for name in ("tokenizer.json", "serving.json"):
            (root / "tokenizer" / name).write_text("{}")
        return root

    general, rec = export(tmp_path / "general", "a" * 64), export(tmp_path / "rec", "f" * 64)
    out = tmp_path / "repository"
    build_repository(S, general, "onnx-int8", "embedded", out)
    build_repository(S.for_family("rec"), rec, "onnx-int8", "embedded", out)
    names = {p.name for p in out.iterdir()}
    assert {"embed", "score", "encoder", "tokenizer", "rec_embed", "rec_score", "rec_encoder", "rec_tokenizer",
            "rec_similarity", "rec_embed_v1"} <= names
    config = text_format.Parse((out / "rec_embed" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["rec_encoder"]  # it takes the text itself
    # ... with its own copy of the tokenizer model's code and file, from its own family's export.
    assert (out / "rec_encoder" / "1" / "tokenizer_model.py").read_bytes() == (
        MODELS_SOURCE / "tokenizer" / "model.py").read_bytes()
    assert (out / "rec_encoder" / "1" / "tokenizer.json").read_text() == "{}"
    rec_config = (out / "rec_encoder" / "config.pbtxt").read_text()
    build_repository(S, general, "onnx-int8", "embedded", out)  # the general family again: rec stays as it was
    assert (out / "rec_encoder" / "config.pbtxt").read_text() == rec_config
    assert (out / "rec_encoder" / "1" / "manifest.json").exists()
    assert remove_family(S.for_family("rec"), out) and not any(p.name.startswith("rec_") for p in out.iterdir())
    assert (out / "embed" / "config.pbtxt").exists()
    with pytest.raises(ValueError, match="not removed"):
        remove_family(S, out)
    with pytest.raises(ValueError, match="unknown model family"):
        S.for_family("ads")
