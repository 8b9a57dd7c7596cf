"""Reading the user's fine-tuned BERT: a Hugging Face directory, a sentence-transformers directory or a
training checkpoint directory. Everything `export` learns about the model is gathered here, once."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bert_recsys.contracts.digest import file_sha256

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
POOLING_MODES = ("mean", "cls")


class SourceModelError(ValueError):
    """The directory is missing, is not a BERT, or has a configuration we cannot serve faithfully."""


@dataclass(frozen=True)
class SourceModel:
    path: Path                # the directory the user gave
    transformer_path: Path    # where config.json + weights live (root, or a sentence-transformers module)
    model_type: str
    dim: int
    max_length: int
    pooling: str              # "mean" or "cls", from the sentence-transformers Pooling module
    num_heads: int
    num_layers: int
    sha256: str               # over every file in the directory, so any change to the model changes it

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "model_type": self.model_type,
            "layers": self.num_layers,
            "heads": self.num_heads,
        }


def directory_sha256(root: Path) -> str:
    """Hash of relative paths and contents, stable across machines and copy order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SourceModelError(f"{path} is not valid JSON: {error}") from None


def _sentence_transformers_modules(root: Path) -> tuple[Path, Path | None]:
    """(transformer dir, pooling dir or None) from modules.json, or (root, None) for a plain HF dir."""
    modules_file = root / "modules.json"
    if not modules_file.exists():
        return root, None
    transformer, pooling = root, None
    for module in _read_json(modules_file):
        kind = module.get("type", "")
        module_dir = root / module.get("path", "")
        if kind.endswith("models.Transformer"):
            transformer = module_dir
        elif kind.endswith("models.Pooling"):
            pooling = module_dir
    return transformer, pooling


def _pooling_mode(pooling_dir: Path | None) -> str:
    if pooling_dir is None:
        return "mean"  # what sentence-transformers itself assumes for a bare HF model
    config = _read_json(pooling_dir / "config.json")
    if config.get("pooling_mode_cls_token"):
        mode = "cls"
    elif config.get("pooling_mode_mean_tokens"):
        mode = "mean"
    else:
        enabled = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
        raise SourceModelError(
            f"unsupported pooling {enabled or 'none'} in {pooling_dir}/config.json; supported: {POOLING_MODES}"
        )
    return mode


def _max_length(root: Path, transformer_dir: Path, config: dict) -> int:
    for candidate in (root / "sentence_bert_config.json", transformer_dir / "sentence_bert_config.json"):
        if candidate.exists():
            value = _read_json(candidate).get("max_seq_length")
            if value:
                return int(value)
    tokenizer_config = transformer_dir / "tokenizer_config.json"
    if tokenizer_config.exists():
        value = _read_json(tokenizer_config).get("model_max_length")
        if value and int(value) < 100_000:  # HF writes a huge sentinel when it has no real limit
            return int(value)
    return int(config["max_position_embeddings"])


def load_source(path: str | Path) -> SourceModel:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise SourceModelError(f"model directory not found: {root}")
    transformer_dir, pooling_dir = _sentence_transformers_modules(root)
    config_file = transformer_dir / "config.json"
    if not config_file.exists():
        raise SourceModelError(f"{root} has no config.json: not a Hugging Face model directory")
    config = _read_json(config_file)
    model_type = config.get("model_type", "")
    if model_type != "bert":
        raise SourceModelError(f"{root} holds a {model_type or 'unknown'!r} model; only BERT is supported")
    if not any((transformer_dir / name).exists() for name in WEIGHT_FILES):
        raise SourceModelError(f"{transformer_dir} has no weights (looked for {', '.join(WEIGHT_FILES)})")
    max_length = _max_length(root, transformer_dir, config)
    max_length = min(max_length, int(config["max_position_embeddings"]))
    return SourceModel(
        path=root,
        transformer_path=transformer_dir,
        model_type=model_type,
        dim=int(config["hidden_size"]),
        max_length=max_length,
        pooling=_pooling_mode(pooling_dir),
        num_heads=int(config["num_attention_heads"]),
        num_layers=int(config["num_hidden_layers"]),
        sha256=directory_sha256(root),
    )
