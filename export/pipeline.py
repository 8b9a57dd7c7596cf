"""The export pipeline: model directory -> gated variants with manifests.

    out/
      tokenizer/            tokenizer files the serving tokenizer loads (tokenizer.json & co.)
      onnx-fp32/            model.onnx + manifest.json   (only variants that passed the gate)
      onnx-int8/ ...
      refused/<variant>/    what failed the gate, with its figures, for inspection; never served
      outcomes.json         each variant's last outcome here (written, refused, skipped, failed) and why, with the
                            machine it was built on: what `make bench` and `make tune` list as not served
      .work/                intermediates (raw export, unfused graphs)

A variant is built in a staging folder and moved into place only after it passes the gate, so a half-written
or refused artifact never sits where the model repository looks.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings as settings_module
from bert_recsys.contracts.digest import file_sha256
from bert_recsys.contracts.manifest import (SCHEMA_VERSION, Artifact, ArtifactFile, GateFigures, Manifest, Precision,
                                           VariantFormat, artifact_problems)
from bert_recsys.export import onnx_export, openvino_variant, torch_variant
from bert_recsys.export.calibration import calibration_batches, read_calibration_texts
from bert_recsys.export.lineage import SOURCES, in_domain_sha256, read_lineage, read_texts
from bert_recsys.export.gate import DEFAULT_THRESHOLDS, GATE_VERSION, TEACHER_SPEARMAN_RATIO, Reference, Thresholds, evaluate
from bert_recsys.export.runners import OrtRunner, TorchRunner, embed_texts
from bert_recsys.export.source import SourceModel, load_source
from bert_recsys.export.tensorrt_plan import ShapeProfile, TensorRTUnavailable, TrtRunner, build_plan, tensorrt_version
from bert_recsys.export.variants import Variant, VariantStatus

log = logs.get("export")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


# Which layers' FFN down-projection stays FP32 by default, per INT8 mode. Chosen on the *selection* half of STS-B
# dev (export.gate.sts_half; 742 pairs), all-MiniLM-L6-v2, 2-core AMD EPYC (AVX2), Spearman ratio to FP32 / b32 s128:
#   per-row, attention FP32 too:  layer 0: 0.99965 / 517 ms; none: 0.99919 / 515 ms; 0 and 5: 0.99961 / 518 ms
#   per-row, attention INT8:      none: 0.99689 / 474 ms; 0 and 5: 0.99776 / 498 ms        (ORT FP32: 616 ms)
#   dynamic (ORT's, whole dev):   0 and 5 lifts 0.9977 to 0.9986 for ~5% of its speed
INT8_FP32_LAYERS = {"per-row": lambda layers: (0,), "dynamic": lambda layers: (0, layers - 1),
                    "static": lambda layers: (0, layers - 1)}
# ov-int8 (NNCF) by the precision OpenVINO computes the rest in, chosen on the selection half: f32 (ov-int8), the
# highest Spearman ratio; bf16 (ov-int8-bf16, a variant for speed), the fastest of those keeping >= 0.9985. See
# export/openvino_variant.py.
OV_INT8_FP32_LAYERS = {"f32": (0,), "bf16": ()}
# ov-int8's calibration text when no --calibration-file is given: unlabeled in-domain text from the shared data
# (STS-B *train*, SciFact corpus, MovieLens titles; never STS-B dev, which the gate reports on).
OV_CALIBRATION_TEXTS = 512
OV_CALIBRATION_BATCH = 16  # padded batches of 16 (selection half, the recipe before: 0.99883; of 1: 0.99755; of 32: 0.99741)
OV_SMOOTH_QUANT = True     # with the attention core FP32: 1.00011 on the selection half, off: 0.99751


@dataclass
class ExportOptions:
    model_dir: Path
    out_dir: Path
    variants: list[Variant]
    variants_named: bool = False          # the user listed variants: a skipped TensorRT one is an error
    threshold_overrides: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> values
    # "per-row" (activations quantized per token at run time: batch-invariant), "dynamic" (ORT's: one scale per
    # batch, so vectors depend on batch-mates; refused by the default batch-invariance threshold) or "static".
    int8_mode: str = "per-row"
    # Layers whose FFN down-projection stays FP32; None = the mode's default (INT8_FP32_LAYERS).
    int8_fp32_layers: tuple[int, ...] | None = None
    # per-row only: quantize the attention's QKV projection too (faster; costs Spearman, see INT8_FP32_LAYERS).
    int8_attention: bool = False
    calibration_file: Path | None = None
    sts_path: Path | None = None
    require_sts: bool = False
    # SciFact train in BEIR format: the gate's retrieval task (export.retrieval); None = not checked.
    retrieval_dir: Path | None = None
    trt_profile: str = ""
    force: bool = False
    # A distilled student's teacher: gated against it too (training.distill). None = the one its lineage names,
    # when that directory exists here.
    teacher_dir: Path | None = None

    def thresholds(self, variant: Variant, student: bool = False) -> Thresholds:
        base = DEFAULT_THRESHOLDS[variant.precision]
        if student:
            base = base.with_overrides(teacher_spearman_ratio=TEACHER_SPEARMAN_RATIO)
        merged = {**self.threshold_overrides.get(variant.precision, {}), **self.threshold_overrides.get(variant.name, {})}
        return base.with_overrides(**merged)

    def ov_int8_fp32_layers(self, variant: Variant) -> tuple[int, ...]:
        """An OpenVINO INT8 variant's FP32 FFN layers: --int8-fp32-layers when given ('' = none), else its own
        (OV_INT8_FP32_LAYERS by the variant's inference precision)."""
        if self.int8_fp32_layers is not None:
            return self.int8_fp32_layers
        return OV_INT8_FP32_LAYERS[variant.inference_precision or "f32"]

    def recipe(self, variant: Variant, teacher_sha256: str | None = None) -> dict:
        """Everything that decides the artifact and its verdict; a change rebuilds the variant."""
        thresholds = self.thresholds(variant, student=teacher_sha256 is not None)
        recipe = {"variant": variant.name, "opset": onnx_export.OPSET, "thresholds": asdict(thresholds)}
        if teacher_sha256:
            recipe["teacher_sha256"] = teacher_sha256
        if variant.precision == Precision.INT8 and variant.format == VariantFormat.OPENVINO:
            recipe.update(int8_fp32_layers=self.ov_int8_fp32_layers(variant), smooth_quant=OV_SMOOTH_QUANT,
                          inference_precision=variant.inference_precision,
                          fp32_attention=list(openvino_variant.ATTENTION_TYPES), calibration_batch=OV_CALIBRATION_BATCH,
                          calibration_sha256=file_sha256(self.calibration_file) if self.calibration_file
                          else in_domain_sha256(settings_module.SHARED_DATA_DIR))
        elif variant.precision == Precision.INT8:
            recipe.update(int8_mode=self.int8_mode, int8_fp32_layers=self.int8_fp32_layers)
            if self.int8_mode == "per-row":
                recipe.update(int8_attention=self.int8_attention, int8_graph=onnx_export.PER_ROW_GRAPH)
            if self.int8_mode == "static" or variant.needs_tensorrt:
                recipe["calibration_sha256"] = file_sha256(self.calibration_file) if self.calibration_file else None
        if variant.format == VariantFormat.OPENVINO:
            recipe["openvino"] = openvino_variant.version()
        if variant.needs_tensorrt:
            recipe["profile"] = self.trt_profile
        if variant.format == VariantFormat.TORCH:
            # The served code is part of the recipe: a change to it re-gates; so does a GPU appearing.
            recipe.update(module_sha256=file_sha256(torch_variant.MODULE), gate_device=torch_variant.gate_device())
        return recipe


@dataclass
class Outcome:
    variant: str
    status: VariantStatus
    detail: str = ""
    figures: GateFigures = field(default_factory=GateFigures)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in (VariantStatus.WRITTEN, VariantStatus.UP_TO_DATE)


def as_os_error(error: Exception, path: Path) -> Exception:
    """The Rust `tokenizers` library reports I/O failures as a bare Exception ending in "(os error N)"; turn that
    into the OSError it is, so a full disk is recognised by its errno, not its wording."""
    found = None if isinstance(error, OSError) else re.search(r"\(os error (\d+)\)\s*$", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def describe_failure(error: BaseException, out: Path) -> str:
    """One line for an Outcome or the CLI. A full disk is said plainly: it is the user's to fix, not a bug."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = error.filename or out
        return (f"no space left on the device writing {where} ({error.strerror}): free space under {out} and "
                "export again; nothing was written where serving looks")
    return f"{type(error).__name__}: {error}"


def recommendation_gate_failures(lineage: dict | None) -> list[str]:
    """A recommendation fine-tune (training.finetune) carries its own gate against the base model, on the
    recommendation task: a model that failed it is refused here, whatever its numerical fidelity."""
    gate = (lineage or {}).get("recommendation_gate")
    if gate is None or gate.get("passed"):
        return []
    return [f"recommendation gate failed in training: {gate.get('metric')} {gate['finetuned'][gate['metric']]:.4f} "
            f"(fine-tuned) vs {gate['base'][gate['metric']]:.4f} (base) on the validation items ({gate.get('rule')})"]


def recipe_sha(source: SourceModel, recipe: dict, gate_sha: str) -> str:
    blob = json.dumps({"source": source.sha256, "gate": gate_sha, "gate_version": GATE_VERSION, **recipe}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def runtime_versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": tensorrt_version(),
        "openvino": openvino_variant.version(),
    }


class Exporter:
    def __init__(self, options: ExportOptions):
        self.options = options
        self.out = Path(options.out_dir)
        self.work = self.out / ".work"
        self.source = load_source(options.model_dir)
        self.lineage = read_lineage(self.source.path)
        self.teacher = self._teacher()
        self._tokenizer = None
        self._reference: Reference | None = None
        self._torch_encoder = None
        self._intermediates: dict[str, Path] = {}
        self.retrieval = self._load_retrieval()

    def _teacher(self) -> SourceModel | None:
        """The teacher of a distilled student: --teacher, else the directory its lineage names if it is here."""
        path = self.options.teacher_dir
        if path is None and self.lineage and "teacher" in self.lineage:
            named = Path(self.lineage["teacher"]["path"])
            if named.is_dir():
                path = named
            else:
                log.warning("the student's teacher %s is not here: gated without the teacher comparison", named)
        return load_source(path) if path is not None else None

    # ---- shared, built lazily and once -------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.source.transformer_path, use_fast=True)
            if not self._tokenizer.is_fast:
                raise RuntimeError("a fast (Rust) tokenizer is required for serving")
        return self._tokenizer

    def embed_with(self, runner, texts, label):
        return embed_texts(runner, self.tokenizer, texts, self.source.max_length, progress=label)

    @property
    def torch_encoder(self):
        if self._torch_encoder is None:
            import torch

            torch.manual_seed(0)
            log.info(f"loading PyTorch FP32 reference from {self.source.transformer_path}")
            self._torch_encoder = onnx_export.load_torch_encoder(self.source)
        return self._torch_encoder

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            log.info("computing the PyTorch FP32 reference (gate set + STS-B dev)")
            self._reference = Reference.build(self.embed_with, TorchRunner(self.torch_encoder), self.options.sts_path)
            if self.retrieval is not None:
                log.info(f"PyTorch FP32 retrieval nDCG@10 ({self.retrieval.name})")
                self._reference.add_retrieval(self.retrieval, TorchRunner(self.torch_encoder))
                log.info(f"PyTorch FP32 SciFact nDCG@10 = {self._reference.retrieval_ndcg:.5f}")
            if self.teacher is not None:
                log.info(f"the teacher's PyTorch FP32 Spearman ({self.teacher.path})")
                self._reference.add_teacher(TorchRunner(onnx_export.load_torch_encoder(self.teacher)))
            if self._reference.sts_spearman is not None:
                log.info(f"PyTorch FP32 STS-B dev Spearman = {self._reference.sts_spearman:.5f}")
            else:
                log.info(f"warning: Spearman gate {self._reference.sts_note}")
        return self._reference

    def intermediate(self, name: str) -> Path:
        """raw (unfused export), fp32 (ORT-fused), raw-qdq (calibrated QDQ of raw, for TensorRT INT8)."""
        if name in self._intermediates:
            return self._intermediates[name]
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / f"{name}.onnx"
        inputs = {"fp32": "raw", "raw-qdq": "raw"}
        source = self.intermediate(inputs[name]) if name in inputs else None
        partial = self.work / f".{name}.partial.onnx"  # a failed write never leaves a file that looks finished
        try:
            if name == "raw":
                log.info("exporting PyTorch -> ONNX (eager attention, pooling + L2 normalization in the graph)")
                onnx_export.export_raw_onnx(self.torch_encoder, partial)
            elif name == "fp32":
                fused = onnx_export.optimize_fp32(source, partial, self.source)
                log.info(f"ORT fusions: {fused}")
            elif name == "raw-qdq":
                onnx_export.quantize_int8_static(source, partial, self.calibration(), [])
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self._intermediates[name] = path
        return path

    def calibration(self, in_domain_default: bool = False, batch_size: int = 32) -> list:
        """--calibration-file's texts; without one, ov-int8 (`in_domain_default`) calibrates on in-domain text from
        the shared data (export.lineage.read_texts), the others refuse."""
        if self.options.calibration_file is not None:
            texts = read_calibration_texts(self.options.calibration_file)
            where = str(self.options.calibration_file)
        elif in_domain_default:
            try:
                texts, _ = read_texts(settings_module.SHARED_DATA_DIR, list(SOURCES), OV_CALIBRATION_TEXTS)
            except FileNotFoundError as error:
                raise ValueError(f"ov-int8 calibrates on the shared data by default, which is missing ({error}): "
                                 "pass --calibration-file FILE") from None
            where = f"{settings_module.SHARED_DATA_DIR} ({', '.join(SOURCES)})"
        else:
            raise ValueError("static INT8 and trt-int8 need calibration text: pass --calibration-file FILE")
        log.info(f"calibrating on {len(texts)} texts from {where}")
        return calibration_batches(self.tokenizer, texts, self.source.max_length, batch_size=batch_size)

    def save_tokenizer(self) -> Path:
        target = self.out / "tokenizer"
        staging = self.out / ".staging-tokenizer"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            try:
                self.tokenizer.save_pretrained(staging)
            except Exception as error:
                raise as_os_error(error, staging) from error
            # Keep only what serving needs; the serving tokenizer reads tokenizer.json directly.
            for extra in staging.iterdir():
                if extra.name not in TOKENIZER_FILES:
                    extra.unlink()
            config = {"max_length": self.source.max_length, "source_sha256": self.source.sha256}
            (staging / "serving.json").write_text(json.dumps(config, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # the tokenizer in place stays as it was
            raise
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return target

    # ---- one variant -------------------------------------------------------------------------------
    def build_artifact(self, variant: Variant, staging: Path) -> tuple[dict, object]:
        """Writes the artifact into staging; returns (manifest details, runner for the gate)."""
        artifact = staging / variant.artifact
        details: dict = {}
        if variant.name == "onnx-fp32":
            shutil.copyfile(self.intermediate("fp32"), artifact)
            details["optimizations"] = "ORT transformer fusions (opt_level 1)"
        elif variant.name == "onnx-fp16":
            details["fp16"] = onnx_export.convert_fp16(self.intermediate("fp32"), artifact)
        elif variant.name == "onnx-int8":
            fp32 = self.intermediate("fp32")
            layers = self.options.int8_fp32_layers
            if layers is None:
                layers = INT8_FP32_LAYERS[self.options.int8_mode](self.source.num_layers)
            keep = onnx_export.ffn_output_matmuls(fp32, layers)
            if self.options.int8_mode == "per-row" and not self.options.int8_attention:
                keep += onnx_export.attention_nodes(fp32)
            if self.options.int8_mode == "static":
                details["quantization"] = onnx_export.quantize_int8_static(fp32, artifact, self.calibration(), keep)
            elif self.options.int8_mode == "per-row":
                details["quantization"] = onnx_export.quantize_int8_per_row(fp32, artifact, keep)
            else:
                details["quantization"] = onnx_export.quantize_int8_dynamic(fp32, artifact, keep)
        elif variant.format == VariantFormat.OPENVINO:
            if variant.precision == Precision.INT8:
                details["openvino"] = openvino_variant.quantize_int8(self.intermediate("raw"), artifact,
                                                                     self.calibration(True, OV_CALIBRATION_BATCH),
                                                                     self.options.ov_int8_fp32_layers(variant),
                                                                     smooth_quant=OV_SMOOTH_QUANT)
            else:
                details["openvino"] = openvino_variant.convert(self.intermediate("raw"), artifact)
            precision = openvino_variant.inference_precision(variant.precision, variant.inference_precision)
            details["openvino"]["inference_precision"] = precision
            details["openvino"]["cpu_capabilities"] = openvino_variant.capabilities()
            return details, openvino_variant.OpenVinoRunner(artifact, variant.precision, name=variant.name,
                                                            inference=precision)
        elif variant.format == VariantFormat.TORCH:
            details["torch"] = torch_variant.write(self.torch_encoder, self.source, variant.precision, artifact)
            runner = torch_variant.TorchBertRunner(artifact, variant.precision, name=variant.name)
            details["torch"].update(runner.describe())
            return details, runner
        elif variant.needs_tensorrt:
            profile = ShapeProfile.parse(self.options.trt_profile, self.source.max_length)
            onnx_input = self.intermediate("raw-qdq" if variant.precision == Precision.INT8 else "raw")
            details["tensorrt"] = build_plan(onnx_input, artifact, variant.precision, profile)
            return details, TrtRunner(artifact, variant.name)
        else:
            raise ValueError(f"no recipe for {variant.name}")
        return details, OrtRunner(artifact, name=variant.name)

    def export_variant(self, variant: Variant) -> Outcome:
        started = time.perf_counter()
        final = self.out / variant.name
        recipe = self.options.recipe(variant, self.teacher.sha256 if self.teacher else None)
        key = recipe_sha(self.source, recipe, self.reference_sha())
        if not self.options.force and final.exists() and not artifact_problems(final):
            manifest = Manifest.read(final)
            if manifest.recipe_sha256 == key:
                return Outcome(variant.name, VariantStatus.UP_TO_DATE, str(final), manifest.gate.figures)
        if variant.needs_tensorrt and tensorrt_version() is None:
            return Outcome(variant.name, VariantStatus.SKIPPED, "tensorrt is not importable here (it ships in the NGC images, see docker/)")
        if variant.format == VariantFormat.OPENVINO and "bf16" in (variant.precision, variant.inference_precision):
            try:
                openvino_variant.require_bf16(variant.name)
            except openvino_variant.OpenVinoUnavailable as error:
                return Outcome(variant.name, VariantStatus.SKIPPED, str(error))

        staging = self.out / f".staging-{variant.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            return self._build_gate_and_place(variant, staging, final, recipe, key, started)
        except TensorRTUnavailable as error:
            return Outcome(variant.name, VariantStatus.SKIPPED, str(error))
        finally:
            # Whatever went wrong (a full disk, a crash in a converter), no half-built variant stays behind.
            shutil.rmtree(staging, ignore_errors=True)

    def _build_gate_and_place(self, variant: Variant, staging: Path, final: Path, recipe: dict, key: str,
                              started: float) -> Outcome:
        log.info(f"{variant.name}: building")
        details, runner = self.build_artifact(variant, staging)
        log.info(f"{variant.name}: gate against PyTorch FP32")
        thresholds = self.options.thresholds(variant, student=self.teacher is not None)
        result = evaluate(runner, self.reference, thresholds, require_sts=self.options.require_sts)
        result.failures.extend(recommendation_gate_failures(self.lineage))
        manifest = self.manifest(variant, staging / variant.artifact, details, result.to_json(thresholds), recipe, key,
                                 export_seconds=round(time.perf_counter() - started, 2))
        manifest.write(staging)
        target = final if result.passed else self.out / "refused" / variant.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if result.passed:
            shutil.rmtree(self.out / "refused" / variant.name, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)  # an older passing build of a now-failing recipe must not serve
        # The old build moves aside and the new one in by renames (no space needed, nothing half-copied).
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        status = VariantStatus.WRITTEN if result.passed else VariantStatus.REFUSED
        return Outcome(variant.name, status, "; ".join(result.failures) or str(target), result.figures,
                       time.perf_counter() - started)

    def reference_sha(self) -> str:
        """What the gate measures on: the gate sentences, and the retrieval subset when there is one."""
        from bert_recsys.export.gate import load_gate_sentences

        sentences = load_gate_sentences()[1]
        return sentences if self.retrieval is None else f"{sentences}+retrieval:{self.retrieval.sha256}"

    def _load_retrieval(self):
        """The retrieval subset (export.retrieval); None where it is not asked for or not found."""
        directory = self.options.retrieval_dir
        if directory is None:
            return None
        if not (Path(directory) / "qrels" / "train.tsv").exists():
            log.info(f"warning: retrieval gate not run: no SciFact train at {directory}")
            return None
        from bert_recsys.export.retrieval import load_scifact

        return load_scifact(directory)

    def manifest(self, variant: Variant, artifact: Path, details: dict, gate: dict, recipe: dict, key: str,
                 export_seconds: float) -> Manifest:
        tensors = onnx_export.INPUT_NAMES
        tokenizer_json = self.out / "tokenizer" / "tokenizer.json"
        return Manifest.from_json({
            "schema_version": SCHEMA_VERSION,
            "variant": variant.name,
            "format": variant.format,
            "precision": variant.precision,
            "source": self.source.describe(),
            "encoder": {
                "dim": self.source.dim,
                "max_length": self.source.max_length,
                "pooling": self.source.pooling,
                "normalized": True,
            },
            "inputs": [{"name": n, "dtype": "INT64", "shape": ["batch", "sequence"]} for n in tensors],
            "outputs": [{"name": onnx_export.OUTPUT_NAME, "dtype": "FP32", "shape": ["batch", self.source.dim]}],
            "opset": onnx_export.OPSET,
            "runtimes": runtime_versions(),
            "artifact": Artifact(**ArtifactFile.of(artifact).to_json(), companions=(
                openvino_variant.weights_file(artifact),) if variant.format == VariantFormat.OPENVINO else ()).to_json(),
            "tokenizer": {"sha256": file_sha256(tokenizer_json) if tokenizer_json.exists() else None},
            "details": details,
            "gate": gate,
            "recipe": recipe,
            "recipe_sha256": key,
            **({"lineage": self.lineage} if self.lineage else {}),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "export_seconds": export_seconds,
        })


def run_export(options: ExportOptions) -> list[Outcome]:
    out = Path(options.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output directory {out} is not writable: {error}") from None
    exporter = Exporter(options)
    log.info(f"source {exporter.source.path} ({exporter.source.model_type}, dim {exporter.source.dim}, "
        f"max length {exporter.source.max_length}, {exporter.source.pooling} pooling, sha256 {exporter.source.sha256[:12]})")
    exporter.save_tokenizer()
    outcomes = []
    for variant in options.variants:
        try:
            outcome = exporter.export_variant(variant)
        except Exception as error:  # one broken variant must not hide the others' results
            outcome = Outcome(variant.name, VariantStatus.FAILED, describe_failure(error, out))
        log.info(f"{variant.name}: {outcome.status} {outcome.detail}")
        outcomes.append(outcome)
    record_outcomes(out, outcomes)
    return outcomes


OUTCOMES_FILE = "outcomes.json"


def merge_outcomes(record: dict, outcomes: list[Outcome], machine: dict, when: str) -> dict:
    """The outcomes record with this run's variants replaced (the others keep their last outcome)."""
    variants = dict(record.get("variants", {}))
    for outcome in outcomes:
        variants[outcome.variant] = {"status": str(outcome.status), "detail": outcome.detail, "machine": machine,
                                     "at": when}
    return {"variants": dict(sorted(variants.items()))}


def not_served(outcomes: dict, served: set[str], wanted, machine: dict | None = None) -> list[dict]:
    """The wanted variants that will not be measured, each with why: its last export's status and detail
    (refused by the gate, not supported on this CPU, failed to build), that it was never exported, or that the
    outcome was recorded on another machine (`machine`: this one's identity; None: not checked)."""
    rows = []
    for variant in wanted:
        if variant in served:
            continue
        outcome = outcomes.get(variant)
        if outcome is None:
            rows.append({"variant": variant, "status": "not exported", "detail": "run make tune (or make export)"})
        elif machine is not None and outcome.get("machine") not in (None, machine):
            where = outcome["machine"].get("cpu", "another machine") if isinstance(outcome["machine"], dict) else "?"
            rows.append({"variant": variant, "status": "stale",
                         "detail": f"its last export ran on {where}, not here: export it again on this machine"})
        elif outcome["status"] in (VariantStatus.WRITTEN, VariantStatus.UP_TO_DATE):
            rows.append({"variant": variant, "status": "missing",
                         "detail": "exported, but no gated manifest is in place now: export it again"})
        else:
            status = "not supported here" if outcome["status"] == VariantStatus.SKIPPED else outcome["status"]
            rows.append({"variant": variant, "status": str(status), "detail": outcome["detail"]})
    return rows


def read_outcomes(out: Path) -> dict:
    """{variant: {status, detail, machine, at}} from the last exports into `out` ({} before any)."""
    path = Path(out) / OUTCOMES_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("variants", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({error}): delete it and export again") from None


def record_outcomes(out: Path, outcomes: list[Outcome]) -> None:
    from bert_recsys.contracts.machine import machine_identity

    path = Path(out) / OUTCOMES_FILE
    try:
        record = {"variants": read_outcomes(out)}
    except ValueError:
        record = {}
    merged = merge_outcomes(record, outcomes, machine_identity(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    partial = path.with_name(f".{OUTCOMES_FILE}.partial")
    try:
        partial.write_text(json.dumps(merged, indent=1), encoding="utf-8")
        os.replace(partial, path)
    except OSError as error:  # a full disk: the export's own outcome stands; only the record of it is missing
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        log.warning(f"could not record the outcomes in {path}: {describe_failure(error, Path(out))}")
