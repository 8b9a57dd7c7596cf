"""Calibration text for static INT8 (ORT QDQ and TensorRT): a user file, one text per line."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bert_recsys.export.onnx_export import INPUT_NAMES
from bert_recsys.export.runners import tokenize


def read_calibration_texts(path: Path, limit: int = 2048) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration file {path} has no text lines")
    return texts[:limit]


def calibration_batches(tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Feeds for the calibrator: length-sorted batches so padding does not skew activation ranges."""
    texts = sorted(texts, key=len)
    batches = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[start : start + batch_size], max_length)
        batches.append({INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})
    return batches
