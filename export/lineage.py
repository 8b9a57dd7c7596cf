"""What a trained model directory says about where it came from, and the unlabeled in-domain text that
calibration and the trainers read: the export pipeline reads both, without importing a trainer (training/)."""
from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

from bert_recsys.contracts.digest import file_sha256

LINEAGE_FILE = "distill.json"
SOURCES = ("sts-train", "scifact", "movielens")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def source_files(data_dir: Path) -> dict[str, Path]:
    """Where each source of unlabeled in-domain text is in the shared data."""
    data_dir = Path(data_dir)
    return {"sts-train": data_dir / "stsbenchmark-train-dev" / "sts-train.csv",
            "scifact": data_dir / "scifact-train" / "corpus.jsonl",
            "movielens": data_dir / "movielens-latest-small" / "movies.csv"}


def in_domain_sha256(data_dir: Path) -> str:
    """One hash of every source file read_texts would read (a missing one counts as missing): what an in-domain
    calibration depends on, so new data re-gates the variant."""
    parts = [f"{name}:{file_sha256(path) if path.is_file() else 'missing'}" for name, path in source_files(data_dir).items()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_texts(data_dir: Path, sources: list[str], limit: int, seed: int = 0) -> tuple[list[str], dict]:
    """Unlabeled text from the shared data: -> (texts, provenance by source). Deduplicated, shuffled, capped."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown data source {sorted(unknown)}; choose from {', '.join(SOURCES)}")
    files = source_files(data_dir)
    texts: dict[str, None] = {}
    provenance = {}
    for source in sources:
        path = files[source]
        if not path.is_file():
            raise FileNotFoundError(f"{source}: {path} not found (SHARED_DATA_DIR={data_dir})")
        found = []
        if source == "sts-train":
            with open(path, encoding="utf-8") as handle:
                for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                    found += [row[5], row[6]]
        elif source == "scifact":
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    doc = json.loads(line)
                    found.append(doc["title"])
                    words = doc["text"].split()
                    for start in range(0, min(len(words), 240), 80):  # abstracts, in passages the encoder sees whole
                        found.append(" ".join(words[start:start + 80]))
        else:
            with open(path, encoding="utf-8", newline="") as handle:
                for row in csv.DictReader(handle):
                    found.append(f"{row['title']} ({row['genres'].replace('|', ', ')})")
        before = len(texts)
        for text in found:
            if text.strip():
                texts.setdefault(text.strip(), None)
        provenance[source] = {"file": str(path), "sha256": file_sha256(path), "texts": len(texts) - before}
    ordered = list(texts)
    random.Random(seed).shuffle(ordered)
    return ordered[:limit], provenance

# A model directory's lineage: a distilled student's (training/distill.py) or a recommendation fine-tune's (training/).
LINEAGE_FILES = (LINEAGE_FILE, "finetune.json")


def read_lineage(model_dir: Path) -> dict | None:
    """The lineage file a trainer left in `model_dir` (distill.json or finetune.json), or None."""
    for name in LINEAGE_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            return json.loads(path.read_text())
    return None
