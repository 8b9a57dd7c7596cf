"""The export manifest: one JSON file beside every artifact, saying exactly what it is and how it was checked.

`export` writes it; the repository renderer, the rollout and the benchmarks read it, always through
`Manifest.read`, which checks the schema version and the fields every reader relies on. It travels into the
model repository with each encoder version, so "what exactly is serving" has an answer. Fields the readers
do not need (runtime versions, recipe, export details) are kept as they are in `extra` and written back.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from bert_recsys.contracts.digest import file_sha256

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, of another schema version, or lacks a field. Names the file."""


class VariantFormat(StrEnum):
    ONNX = "onnx"
    TENSORRT_PLAN = "tensorrt_plan"
    TORCH = "torch"          # safetensors weights for encoders/torch_bert.py (the torch runtime)
    OPENVINO = "openvino"    # OpenVINO IR: model.xml, with its weights in model.bin (a companion file)


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


@dataclass(frozen=True)
class EncoderSpec:
    """What the model is, learned from it at export: every config is rendered from these."""

    dim: int
    max_length: int
    pooling: str = "mean"
    normalized: bool = True

    def __post_init__(self):
        if self.dim <= 0 or self.max_length <= 0:
            raise ManifestError(f"encoder dim and max_length must be positive, not {self.dim} and {self.max_length}")


@dataclass(frozen=True)
class ArtifactFile:
    file: str
    sha256: str
    bytes: int

    def __post_init__(self):
        if "/" in self.file or self.file in ("", ".", ".."):
            raise ManifestError(f"artifact file must be a plain file name, not {self.file!r}")

    @classmethod
    def of(cls, path: Path) -> "ArtifactFile":
        """The file at `path` as a manifest records it: its name, sha256 and size."""
        path = Path(path)
        return cls(path.name, file_sha256(path), path.stat().st_size)

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class Artifact(ArtifactFile):
    """The file a runtime loads, and the files it needs beside it (`companions`: an OpenVINO IR's model.bin),
    each with its own size and hash. Wherever the artifact goes (a repository, a new encoder version), they go."""

    companions: tuple[ArtifactFile, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        companions = tuple(c if isinstance(c, ArtifactFile) else ArtifactFile(**c) for c in self.companions)
        if len({f.file for f in (self, *companions)}) != 1 + len(companions):
            raise ManifestError(f"artifact files must have distinct names: {[f.file for f in (self, *companions)]}")
        object.__setattr__(self, "companions", companions)

    @property
    def files(self) -> tuple[ArtifactFile, ...]:
        return (self, *self.companions)

    def to_json(self) -> dict:
        companions = {"companions": [c.to_json() for c in self.companions]} if self.companions else {}
        return {**super().to_json(), **companions}


@dataclass
class GateFigures:
    """What the export gate measured against PyTorch FP32 (and, for a distilled student, against its teacher).
    None: not measured (no STS-B or SciFact data, or not a student). The STS-B dev set is split in two halves:
    recipes are chosen on `selection` and reported on `confirmation`."""

    cosine_mean: float | None = None                 # gate sentences: cosine to PyTorch FP32's vectors
    cosine_min: float | None = None
    batch_invariance_min_cosine: float | None = None  # a text alone against the same text in a padded batch
    sts_spearman: float | None = None                 # STS-B dev Spearman, whole dev
    sts_spearman_fp32: float | None = None
    spearman_ratio: float | None = None               # sts_spearman / sts_spearman_fp32
    spearman_ratio_selection: float | None = None
    spearman_ratio_confirmation: float | None = None
    sts_spearman_teacher: float | None = None
    spearman_ratio_to_teacher: float | None = None
    spearman_ratio_to_teacher_selection: float | None = None
    spearman_ratio_to_teacher_confirmation: float | None = None
    retrieval_ndcg10: float | None = None             # SciFact (BEIR) nDCG@10
    retrieval_ndcg10_fp32: float | None = None
    retrieval_ndcg_ratio: float | None = None
    gate_set: dict | None = None                      # which gate sentences: count and sha256
    retrieval_set: dict | None = None                 # which SciFact queries and documents
    sts: str | None = None                            # where the STS-B figures come from, or why there are none
    retrieval: str | None = None                      # the same for retrieval
    other: dict = field(default_factory=dict)         # figures this version does not know, kept verbatim

    def to_json(self) -> dict:
        known = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        return {**{k: v for k, v in known.items() if v is not None}, **self.other}

    @classmethod
    def from_json(cls, data: dict) -> "GateFigures":
        names = {f.name for f in fields(cls)} - {"other"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   other={k: v for k, v in data.items() if k not in names})


@dataclass(frozen=True)
class GateRecord:
    """The export gate's verdict against PyTorch FP32: figures and thresholds as the gate wrote them."""

    passed: bool
    failures: tuple[str, ...] = ()
    figures: GateFigures = field(default_factory=GateFigures)
    thresholds: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures), "figures": self.figures.to_json(),
                "thresholds": self.thresholds}


@dataclass(frozen=True)
class Manifest:
    variant: str
    format: VariantFormat
    precision: Precision
    encoder: EncoderSpec
    artifact: Artifact
    gate: GateRecord
    source_sha256: str
    tokenizer_sha256: str | None
    exported_at: str
    recipe_sha256: str = ""
    extra: dict = field(default_factory=dict)   # every other field, kept verbatim
    # sha256 of the file this manifest was read from: the serving identity of an encoder version.
    file_sha256: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "format", VariantFormat(self.format))
        object.__setattr__(self, "precision", Precision(self.precision))

    @property
    def openvino_precision(self) -> str | None:
        """OpenVINO variants: what the CPU plugin computes the unquantized ops in (f32 or bf16), as the export
        gated them (details.openvino.inference_precision; bf16 for a BF16 variant that predates the field)."""
        if self.format != VariantFormat.OPENVINO:
            return None
        recorded = self.extra.get("details", {}).get("openvino", {}).get("inference_precision")
        return recorded or ("bf16" if self.precision == Precision.BF16 else "f32")

    # ---- JSON -----------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: dict, where: str = "manifest", file_sha256: str = "") -> "Manifest":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{where}: schema_version {version!r}, this code reads {SCHEMA_VERSION}: "
                                "export the variant again with this version")
        try:
            gate = data["gate"]
            return cls(
                variant=data["variant"], format=data["format"], precision=data["precision"],
                encoder=EncoderSpec(**data["encoder"]),
                artifact=Artifact(**data["artifact"]),
                gate=GateRecord(bool(gate["passed"]), tuple(gate.get("failures", ())),
                                GateFigures.from_json(gate.get("figures", {})),
                                gate.get("thresholds", {})),
                source_sha256=data["source"]["sha256"],
                tokenizer_sha256=data["tokenizer"]["sha256"],
                exported_at=data["exported_at"],
                recipe_sha256=data.get("recipe_sha256", ""),
                extra={k: v for k, v in data.items() if k not in _TYPED},
                file_sha256=file_sha256,
            )
        except KeyError as missing:
            raise ManifestError(f"{where}: missing field {missing}") from None
        except (TypeError, ValueError) as error:
            raise ManifestError(f"{where}: {error}") from None

    def to_json(self) -> dict:
        source = {**self.extra.get("source", {}), "sha256": self.source_sha256}
        return {
            **{k: v for k, v in self.extra.items() if k != "source"},
            "schema_version": SCHEMA_VERSION,
            "variant": self.variant, "format": str(self.format), "precision": str(self.precision),
            "encoder": {"dim": self.encoder.dim, "max_length": self.encoder.max_length,
                        "pooling": self.encoder.pooling, "normalized": self.encoder.normalized},
            "artifact": self.artifact.to_json(),
            "gate": self.gate.to_json(),
            "source": source,
            "tokenizer": {"sha256": self.tokenizer_sha256},
            "exported_at": self.exported_at,
            "recipe_sha256": self.recipe_sha256,
        }

    def text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    # ---- files ----------------------------------------------------------------------------------------
    @classmethod
    def path(cls, directory: Path) -> Path:
        return Path(directory) / MANIFEST_NAME

    @classmethod
    def exists(cls, directory: Path) -> bool:
        return cls.path(directory).is_file()

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = cls.path(directory)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"no {MANIFEST_NAME} in {directory}: export the variant first") from None
        except OSError as error:
            raise ManifestError(f"{path}: {error.strerror or error}") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ManifestError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path} does not hold a JSON object")
        return cls.from_json(data, str(path), hashlib.sha256(raw).hexdigest())

    def write(self, directory: Path) -> Path:
        """Written beside and renamed into place: a reader never sees half a manifest."""
        path = self.path(directory)
        partial = path.with_name(f".{MANIFEST_NAME}.partial")
        partial.write_text(self.text())
        os.replace(partial, path)
        return path

    def artifact_problems(self, directory: Path) -> list[str]:
        """Empty when the artifact in `directory` (and every companion file) is the one this manifest describes."""
        problems = []
        for expected in self.artifact.files:
            path = Path(directory) / expected.file
            if not path.exists():
                problems.append(f"artifact {path} is missing")
                continue
            size = path.stat().st_size
            if size != expected.bytes:
                problems.append(f"{path.name} is {size} bytes, manifest says {expected.bytes}")
            if file_sha256(path) != expected.sha256:
                problems.append(f"{path.name} sha256 differs from the manifest")
        return problems


_TYPED = {"schema_version", "variant", "format", "precision", "encoder", "artifact", "gate", "tokenizer",
          "exported_at", "recipe_sha256"}


def artifact_problems(directory: Path) -> list[str]:
    """Empty when `directory` holds a readable manifest and the very artifact it describes."""
    try:
        return Manifest.read(directory).artifact_problems(directory)
    except ManifestError as error:
        return [str(error)]
