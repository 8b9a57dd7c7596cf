"""Renders the Triton model repository from `settings.SETTINGS` and an export manifest.

Every config.pbtxt is built as a `ModelConfig` protobuf (Triton's own schema, shipped in tritonclient) and
printed with `text_format`, so a misspelt field fails here rather than at server start.

Runtimes of the encoder (the tokenizer and similarity models are the same Python code in all of them):
- embedded: Python backend running ONNX Runtime (onnx-*) or OpenVINO (ov-*), picked per encoder version by its
            manifest; the only option on the pip-installed tritonserver.
- native:   `onnxruntime_onnx` (CUDA, TensorRT accelerator for FP16), `openvino` (CPU) or `tensorrt_plan`, for the
            NGC image.
- torch:    Python backend running encoders/torch_bert.py (copied beside its model.py): a KIND_GPU instance
            group with FP16 and CUDA graphs where there is a GPU, FP32 on the CPU otherwise.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from bert_recsys.contracts.digest import files_identity
from bert_recsys.contracts.manifest import MANIFEST_NAME, Manifest, ManifestError, Precision, VariantFormat
from bert_recsys.contracts.runtime import Runtime, runtime_formats
from bert_recsys.settings import Device, Settings

RUNTIMES = tuple(r.value for r in Runtime)
MODELS_SOURCE = Path(__file__).with_name("models")
# The encoder's model.py per runtime (the Python-backend ones), and what the torch one imports beside it.
ENCODER_SOURCES = {Runtime.EMBEDDED: "encoder_embedded", Runtime.TORCH: "encoder_torch"}
# Where it is found, without importing it (and torch with it) here.
TORCH_BERT_SOURCE = Path(importlib.util.find_spec("bert_recsys.encoders.torch_bert").origin)
# The tokenizer model's file, as a text-taking encoder imports it beside its own model.py.
TOKENIZER_MODULE = "tokenizer_model.py"
# The formats each runtime can serve.
RUNTIME_FORMATS = runtime_formats()
# (batch, sequence) shapes the encoder runs at load, so request one is not slow. The largest possible shape
# (max batch x the model's max length) is among them: ONNX Runtime's memory arena grows to its peak at load
# instead of jumping in production at the first large batch (measured by `make soak`: +21 MB on the encoder
# stub two minutes into a soak without it).
ENCODER_WARMUP = ((1, 16), (8, 128))


def torch_encoder_on_gpu(settings: Settings) -> bool:
    """ENCODER_DEVICE: gpu, cpu, or auto (a GPU when torch sees CUDA here, where the server will run)."""
    device = settings.instances.encoder_device
    if device is not Device.AUTO:
        return device is Device.GPU
    import torch

    return torch.cuda.is_available()


def encoder_warmup_shapes(settings: Settings, max_length: int) -> list[tuple[int, int]]:
    return [*ENCODER_WARMUP, (settings.batching.max_batch_size, max_length)]


def encoder_takes_text(settings: Settings, runtime: Runtime | str) -> bool:
    """Whether the encoder is sent TEXT and tokenizes it itself: the embedded runtime's Python encoder, unless
    ENCODER_TOKENIZES is false. The ensembles then skip the tokenizer model (one stub hop less per request);
    native backends and the torch runtime take token ids from it. With a bounded queue (backpressure) the tokenizer
    stays the entry step: the queue policy was measured there, on its two instances (docs/loadtest.md), and with one
    instance Triton 2.51 stalled accepted requests once it started rejecting; the encoder has one."""
    bounded = settings.batching.max_queue_size > 0 or settings.batching.queue_timeout_us > 0
    return Runtime.parse(runtime) == Runtime.EMBEDDED and settings.instances.encoder_tokenizes and not bounded


def _tensor(collection, name: str, dtype: int, dims: list[int], optional: bool = False) -> None:
    tensor = collection.add(name=name, data_type=dtype, dims=dims)
    if optional:  # inputs only
        tensor.optional = True


def _parameters(config: mc.ModelConfig, values: dict) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _batching(config: mc.ModelConfig, settings: Settings, delay_us: int, entry: bool = False) -> None:
    """Dynamic batching; on the entry step of the ensembles (the tokenizer) also the queue policy.
    Rejecting there costs nothing; rejecting at a later step would throw away work already done."""
    config.max_batch_size = settings.batching.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = delay_us
    b = settings.batching
    if entry and (b.max_queue_size > 0 or b.queue_timeout_us > 0):
        policy = config.dynamic_batching.default_queue_policy
        policy.max_queue_size = b.max_queue_size
        policy.default_timeout_microseconds = b.queue_timeout_us
        policy.timeout_action = mc.ModelQueuePolicy.REJECT


def _instances(config: mc.ModelConfig, count: int, gpu: bool = False) -> None:
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=count)


def tokenizer_parameters(settings: Settings, max_length: int) -> dict:
    """What the tokenizer model's TextTokenizer reads, in the tokenizer's config and in a text-taking encoder's."""
    return {
        "max_length": max_length,
        "pad_to_multiple_of": settings.batching.pad_to_multiple_of,
        "max_text_chars": settings.max_text_chars,
        "text_input": settings.tensors.text,
    }


def tokenizer_config(settings: Settings, max_length: int) -> mc.ModelConfig:
    t = settings.tensors
    config = mc.ModelConfig(name=settings.models.tokenizer, backend="python")
    _batching(config, settings, settings.batching.tokenizer_queue_delay_us, entry=True)
    _tensor(config.input, t.text, mc.TYPE_STRING, [1])
    _tensor(config.output, t.input_ids, mc.TYPE_INT64, [-1])
    _tensor(config.output, t.attention_mask, mc.TYPE_INT64, [-1])
    _instances(config, settings.instances.tokenizer)
    _parameters(config, {**tokenizer_parameters(settings, max_length), "ids_output": t.input_ids,
                         "mask_output": t.attention_mask})
    return config


def manifest_parameters(manifest: Manifest, prefix: str = "export_") -> dict:
    """What `GET /v2/models/encoder/config` shows about an export. The manifest file's own sha256 is the
    encoder version's identity (catalog indexes are tagged with it). A recommendation fine-tune also says what it
    was trained on (`trained_split`, `trained_template`, `trained_data_sha256`): the evaluation uses a version
    only for the split it was trained for."""
    params = {
        f"{prefix}variant": manifest.variant,
        f"{prefix}manifest_sha256": manifest.file_sha256,
        f"{prefix}artifact_sha256": manifest.artifact.sha256,
        f"{prefix}source_sha256": manifest.source_sha256,
        f"{prefix}exported_at": manifest.exported_at,
    }
    lineage = manifest.extra.get("lineage") or {}
    if "split" in lineage and "data" in lineage:  # a recommendation fine-tune (training.finetune)
        params.update({f"{prefix}trained_split": lineage["split"]["name"], f"{prefix}trained_template": lineage["template"],
                       f"{prefix}trained_data_sha256": files_identity(lineage["data"]["files"])})
    return params


def encoder_config(settings: Settings, manifest: Manifest, runtime: Runtime | str,
                   versions: dict[int, Manifest] | None = None, stable: int | None = None) -> mc.ModelConfig:
    """`manifest` is the stable version's. With several `versions` ({version: manifest}) all of them load
    (version policy `specific`), and each one's identity is in `export_v<N>_*` parameters; the plain
    `export_*` parameters always describe the version the public ensembles serve."""
    runtime = Runtime.parse(runtime)
    t = settings.tensors
    dim = manifest.encoder.dim
    text = encoder_takes_text(settings, runtime)
    config = mc.ModelConfig(name=settings.models.encoder)
    if versions:
        config.version_policy.specific.versions.extend(sorted(versions))
    _batching(config, settings, settings.batching.encoder_queue_delay_us)
    # Taking text, each request carries TEXT or both id tensors: all three are optional.
    if text:
        _tensor(config.input, t.text, mc.TYPE_STRING, [1], optional=True)
    _tensor(config.input, t.input_ids, mc.TYPE_INT64, [-1], optional=text)
    _tensor(config.input, t.attention_mask, mc.TYPE_INT64, [-1], optional=text)
    _tensor(config.output, t.encoder_output, mc.TYPE_FP32, [dim])
    params = manifest_parameters(manifest)
    if stable is not None:
        params["export_version"] = stable
    for version, version_manifest in sorted((versions or {}).items()):
        params.update(manifest_parameters(version_manifest, prefix=f"export_v{version}_"))
    for version_manifest in (versions or {1: manifest}).values():
        if version_manifest.format not in RUNTIME_FORMATS[runtime]:
            fits = [str(r) for r, formats in RUNTIME_FORMATS.items() if version_manifest.format in formats]
            raise ValueError(f"the {runtime} runtime cannot serve {version_manifest.variant} "
                             f"({version_manifest.format}); use --runtime {' or '.join(fits)}")
    formats = {m.format for m in (versions or {1: manifest}).values()}
    if runtime == Runtime.NATIVE and len(formats) > 1:
        raise ValueError(f"a native encoder has one backend for all its versions; these are {sorted(formats)}: "
                         "serve the new format from a new repository (or use --runtime embedded)")
    params["runtime"] = str(runtime)
    if runtime in ENCODER_SOURCES:  # a Python-backend encoder: names and its artifact come from the config
        config.backend = "python"
        params.update(artifact=manifest.artifact.file, ids_input=t.input_ids, mask_input=t.attention_mask,
                      embedding_output=t.encoder_output)
        if runtime == Runtime.TORCH:
            _instances(config, settings.instances.encoder, gpu=torch_encoder_on_gpu(settings))
            params.update(max_length=manifest.encoder.max_length, cpu_threads=settings.instances.encoder_intra_op_threads,
                          cuda_graphs=str(settings.instances.cuda_graphs).lower())
        else:
            _instances(config, settings.instances.encoder)
            params.update(intra_op_threads=settings.instances.encoder_intra_op_threads,
                          intra_op_spinning=str(settings.instances.encoder_intra_op_spinning).lower())
            if text:
                params.update(tokenizer_parameters(settings, manifest.encoder.max_length))
    elif manifest.format == VariantFormat.OPENVINO:
        _openvino_native(config, settings, list((versions or {1: manifest}).values()))
    elif manifest.format == VariantFormat.TENSORRT_PLAN:
        config.platform = "tensorrt_plan"
        config.default_model_filename = manifest.artifact.file
        _instances(config, settings.instances.encoder, gpu=True)
    else:
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = manifest.artifact.file
        # Dynamic INT8 (MatMulInteger) is a CPU recipe; FP32/FP16 graphs go to the GPU.
        gpu = manifest.precision != Precision.INT8
        _instances(config, settings.instances.encoder, gpu=gpu)
        if gpu and manifest.precision == Precision.FP16:
            accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accelerator.parameters["precision_mode"] = "FP16"
            accelerator.parameters["max_workspace_size_bytes"] = str(4 << 30)
    for batch, seq in encoder_warmup_shapes(settings, manifest.encoder.max_length):
        warmup = config.model_warmup.add(name=f"b{batch}_s{seq}", batch_size=batch)
        for name in (t.input_ids, t.attention_mask):
            warmup.inputs[name].data_type = mc.TYPE_INT64
            warmup.inputs[name].dims.extend([seq])
            warmup.inputs[name].zero_data = True
    _parameters(config, params)
    return config


def _openvino_native(config: mc.ModelConfig, settings: Settings, manifests: list[Manifest]) -> None:
    """Triton's `openvino` backend (NGC image): the IR on the CPU, one stream per instance, latency hint. Its
    parameters are the model's, shared by every version, and it can ask for BF16 (HINT_BF16) but not insist on
    FP32: on a CPU with AMX or AVX512-BF16 OpenVINO computes an FP32 IR in BF16 unless told otherwise, so there an
    ov-fp32 version runs as ov-bf16 would (the embedded runtime sets the precision exactly)."""
    bf16 = {m.openvino_precision == "bf16" for m in manifests}
    if len(bf16) > 1:
        raise ValueError("the openvino backend's precision hint is per model: BF16 and non-BF16 versions cannot "
                         "load side by side; serve the new version from a new repository")
    config.backend = "openvino"
    config.default_model_filename = manifests[0].artifact.file
    _instances(config, settings.instances.encoder)
    values = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if settings.instances.encoder_intra_op_threads:
        values["INFERENCE_NUM_THREADS"] = str(settings.instances.encoder_intra_op_threads)
    if bf16 == {True}:
        values["HINT_BF16"] = "YES"
    _parameters(config, values)


def similarity_config(settings: Settings, dim: int) -> mc.ModelConfig:
    t = settings.tensors
    config = mc.ModelConfig(name=settings.models.similarity, backend="python")
    _batching(config, settings, settings.batching.similarity_queue_delay_us)
    _tensor(config.input, t.query, mc.TYPE_FP32, [dim])
    _tensor(config.input, t.candidates, mc.TYPE_FP32, [-1, dim])
    _tensor(config.output, t.scores, mc.TYPE_FP32, [-1])
    _tensor(config.output, t.query_embedding, mc.TYPE_FP32, [dim])
    _instances(config, settings.instances.similarity)
    _parameters(config, {
        "query_input": t.query,
        "candidates_input": t.candidates,
        "scores_output": t.scores,
        "query_output": t.query_embedding,
    })
    return config


def _step(config: mc.ModelConfig, model: str, inputs: dict, outputs: dict, version: int = -1) -> None:
    """inputs/outputs map the step model's tensor names to the ensemble's tensor names."""
    step = config.ensemble_scheduling.step.add(model_name=model, model_version=version)
    step.input_map.update(inputs)
    step.output_map.update(outputs)


def _encode_steps(config: mc.ModelConfig, settings: Settings, output: str, encoder_version: int,
                  text_in_encoder: bool) -> None:
    """TEXT -> `output`: the encoder alone when it takes text, else tokenizer -> encoder."""
    m, t = settings.models, settings.tensors
    if text_in_encoder:
        _step(config, m.encoder, {t.text: t.text}, {t.encoder_output: output}, encoder_version)
        return
    _step(config, m.tokenizer, {t.text: t.text}, {t.input_ids: t.input_ids, t.attention_mask: t.attention_mask})
    _step(config, m.encoder, {t.input_ids: t.input_ids, t.attention_mask: t.attention_mask}, {t.encoder_output: output},
          encoder_version)


def embed_config(settings: Settings, dim: int, name: str | None = None, encoder_version: int = -1,
                 text_in_encoder: bool = False) -> mc.ModelConfig:
    """embed: TEXT [1] -> EMBEDDING [D]. tokenizer -> encoder (pinned to `encoder_version`), or the encoder alone
    when it takes text (`encoder_takes_text`)."""
    m, t = settings.models, settings.tensors
    config = mc.ModelConfig(name=name or m.embed, platform="ensemble", max_batch_size=settings.batching.max_batch_size)
    _tensor(config.input, t.text, mc.TYPE_STRING, [1])
    _tensor(config.output, t.embedding, mc.TYPE_FP32, [dim])
    _encode_steps(config, settings, t.embedding, encoder_version, text_in_encoder)
    return config


def score_config(settings: Settings, dim: int, name: str | None = None, encoder_version: int = -1,
                 text_in_encoder: bool = False) -> mc.ModelConfig:
    """score: TEXT [1] + CANDIDATES [-1, D] -> SCORES [-1] + QUERY_EMBEDDING [D].
    tokenizer -> encoder -> similarity (no tokenizer step when the encoder takes text). Both outputs come from the
    last step (no subset deadlock)."""
    m, t = settings.models, settings.tensors
    config = mc.ModelConfig(name=name or m.score, platform="ensemble", max_batch_size=settings.batching.max_batch_size)
    _tensor(config.input, t.text, mc.TYPE_STRING, [1])
    _tensor(config.input, t.candidates, mc.TYPE_FP32, [-1, dim])
    _tensor(config.output, t.scores, mc.TYPE_FP32, [-1])
    _tensor(config.output, t.query_embedding, mc.TYPE_FP32, [dim])
    query = "_query_vector"  # internal tensor of the ensemble
    _encode_steps(config, settings, query, encoder_version, text_in_encoder)
    _step(config, m.similarity, {t.query: query, t.candidates: t.candidates},
          {t.scores: t.scores, t.query_embedding: t.query_embedding})
    return config


def render_configs(settings: Settings, manifest: Manifest, runtime: Runtime | str) -> dict[str, mc.ModelConfig]:
    """A repository serving one encoder version (1)."""
    return render_generation(settings, {1: manifest}, runtime, stable=1)


def render_generation(settings: Settings, versions: dict[int, Manifest], runtime: Runtime | str,
                      stable: int) -> dict[str, mc.ModelConfig]:
    """Every config of one repository generation: the encoder with all `versions` loaded, the public
    `embed`/`score` pinned to `stable`, and `embed_v<N>`/`score_v<N>` pinned to each version N.
    A version above `stable` is a canary (model_repository/rollout); one below it is being retired."""
    if stable not in versions:
        raise ValueError(f"stable version {stable} is not among the versions {sorted(versions)}")
    manifest = versions[stable]
    dims = {v: (m.encoder.dim, m.encoder.max_length) for v, m in versions.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"encoder versions disagree on (dim, max length): {dims}")
    dim, max_length = dims[stable]
    m = settings.models
    text = encoder_takes_text(settings, runtime)
    configs = [
        tokenizer_config(settings, max_length),
        encoder_config(settings, manifest, runtime, versions=versions, stable=stable),
        similarity_config(settings, dim),
        embed_config(settings, dim, encoder_version=stable, text_in_encoder=text),
        score_config(settings, dim, encoder_version=stable, text_in_encoder=text),
    ]
    for version in sorted(versions):
        configs += [embed_config(settings, dim, m.pinned(m.embed, version), encoder_version=version, text_in_encoder=text),
                    score_config(settings, dim, m.pinned(m.score, version), encoder_version=version, text_in_encoder=text)]
    return {c.name: c for c in configs}


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard link when possible (large artifacts, same disk), else copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_generation(settings: Settings, tokenizer_dir: Path, version_dirs: dict[int, Path], runtime: Runtime | str,
                     out: Path, stable: int) -> Path:
    """Writes the models of `settings.models.family` to the repository `out` (built aside, swapped in whole);
    the models of other families already in `out` are carried over unchanged. `version_dirs` maps each encoder
    version to a directory holding its manifest.json and artifact: an export variant directory, or a version
    directory of an existing repository. Raises ManifestError (a ValueError) for a missing or unreadable
    manifest."""
    out = Path(out)
    versions = {version: Manifest.read(directory) for version, directory in version_dirs.items()}
    runtime = Runtime.parse(runtime)
    configs = render_generation(settings, versions, runtime, stable)

    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    m = settings.models
    for name, config in configs.items():
        (staging / name).mkdir(parents=True)
        (staging / name / "config.pbtxt").write_text(to_pbtxt(config))
        model_versions = sorted(versions) if name == m.encoder else [1]
        for version in model_versions:
            version_dir = staging / name / str(version)
            version_dir.mkdir()
            if config.backend == "python":
                # Every family runs the same Python models: rec_tokenizer is tokenizer's model.py, and so on.
                base = {m.encoder: ENCODER_SOURCES.get(runtime), m.tokenizer: "tokenizer", m.similarity: "similarity"}[name]
                source = MODELS_SOURCE / base / "model.py"
                shutil.copyfile(source, version_dir / "model.py")
                if name == m.encoder and runtime == Runtime.TORCH:
                    shutil.copyfile(TORCH_BERT_SOURCE, version_dir / TORCH_BERT_SOURCE.name)
                if name == m.encoder and encoder_takes_text(settings, runtime):
                    # Its tokenization is the tokenizer model's code and file, beside its own.
                    shutil.copyfile(MODELS_SOURCE / "tokenizer" / "model.py", version_dir / TOKENIZER_MODULE)
                    shutil.copyfile(Path(tokenizer_dir) / "tokenizer.json", version_dir / "tokenizer.json")
    for file in ("tokenizer.json", "serving.json"):
        shutil.copyfile(Path(tokenizer_dir) / file, staging / m.tokenizer / "1" / file)
    for version, directory in version_dirs.items():
        target = staging / m.encoder / str(version)
        for artifact in versions[version].artifact.files:  # an OpenVINO IR's model.bin goes with its model.xml
            link_or_copy(Path(directory) / artifact.file, target / artifact.file)
        # The manifest's bytes travel unchanged: their sha256 is the version's identity.
        shutil.copyfile(Path(directory) / MANIFEST_NAME, target / MANIFEST_NAME)

    # The other families' models in the repository stay as they are (hard links into the new generation).
    for other in sorted(out.iterdir()) if out.is_dir() else ():
        if other.is_dir() and not other.name.startswith(".") and not m.owns(other.name):
            shutil.copytree(other, staging / other.name, copy_function=lambda a, b: link_or_copy(Path(a), Path(b)))

    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def remove_family(settings: Settings, out: Path) -> list[str]:
    """Removes the models of `settings.models.family` from the repository `out` (each renamed aside, then
    deleted); returns their names. Only a named family ("rec"): the general one is the public contract."""
    if not settings.models.family:
        raise ValueError("the general family (embed, score) is not removed")
    removed = []
    for model in sorted(Path(out).iterdir()) if Path(out).is_dir() else ():
        if model.is_dir() and not model.name.startswith(".") and settings.models.owns(model.name):
            aside = model.with_name(f".{model.name}.removed")
            shutil.rmtree(aside, ignore_errors=True)
            model.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(model.name)
    return removed


def build_repository(settings: Settings, export_dir: Path, variant: str, runtime: Runtime | str, out: Path,
                     version: int = 1) -> Path:
    """A repository serving one exported variant as encoder version `version`."""
    export_dir = Path(export_dir)
    if not Manifest.exists(export_dir / variant):
        raise ManifestError(f"{export_dir / variant} has no {MANIFEST_NAME}: "
                            f"run `bert-recsys export --variants {variant}` first")
    return write_generation(settings, export_dir / "tokenizer", {version: export_dir / variant}, runtime, out, stable=version)
