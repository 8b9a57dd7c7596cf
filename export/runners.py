"""Runners: one call signature, (input_ids, attention_mask) -> embeddings, for every runtime.

The gate and the benchmark only see runners, so a new runtime needs a runner and nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from bert_recsys.export.onnx_export import INPUT_NAMES


class Runner(Protocol):
    name: str

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    def __init__(self, encoder, name: str = "pytorch-fp32"):
        import torch

        self._torch = torch
        self.encoder = encoder
        self.name = name

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.encoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return out.float().numpy()


class OrtRunner:
    def __init__(self, path: Path, name: str | None = None, threads: int = 0, providers: Sequence[str] = ()):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(path), options, providers=list(providers) or ["CPUExecutionProvider"]
        )
        self.name = name or Path(path).parent.name

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {INPUT_NAMES[0]: input_ids, INPUT_NAMES[1]: attention_mask}
        return self.session.run(None, feeds)[0]


def runner_for(directory: Path, manifest, name: str | None = None):
    """The runner for an exported variant (its folder and manifest): ONNX Runtime, OpenVINO at the inference
    precision it was gated at, or the torch runtime's code in FP32 on the CPU."""
    from bert_recsys.contracts.manifest import Precision, VariantFormat

    path = Path(directory) / manifest.artifact.file
    name = name or manifest.variant
    if manifest.format == VariantFormat.OPENVINO:
        from bert_recsys.export.openvino_variant import OpenVinoRunner

        return OpenVinoRunner(path, manifest.precision, name=name, inference=manifest.openvino_precision)
    if manifest.format == VariantFormat.TORCH:
        from bert_recsys.export.torch_variant import TorchBertRunner

        return TorchBertRunner(path, Precision.FP32, "cpu", name=name)
    if manifest.format == VariantFormat.ONNX:
        return OrtRunner(path, name=name)
    raise ValueError(f"{manifest.variant}: no CPU runner for the {manifest.format} format")


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)


def embed_texts(
    runner: Callable[[np.ndarray, np.ndarray], np.ndarray],
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
    progress: str | None = None,
) -> np.ndarray:
    """Embeds texts in length-sorted batches (little padding) and returns them in the input order."""
    from tqdm import tqdm

    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    starts = range(0, len(texts), batch_size)
    # disable=None: a bar on a terminal, silence in logs (the pipeline prints its own step lines there).
    for start in tqdm(starts, desc=progress, disable=None if progress else True, leave=False, unit="batch"):
        index = order[start : start + batch_size]
        ids, mask = tokenize(tokenizer, [texts[i] for i in index], max_length)
        vectors = runner(ids, mask)
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[index] = vectors
    assert out is not None, "no texts to embed"
    return out
