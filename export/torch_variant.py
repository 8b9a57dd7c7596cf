"""The torch variants (`torch-fp32`, `torch-fp16`): the source BERT's weights in the layout of
encoders/torch_bert.py, in one safetensors file. The gate runs that same module, on CUDA when this machine has
it (FP16 is gated on the GPU it is meant for) and on the CPU otherwise."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bert_recsys.contracts.manifest import Precision
from bert_recsys.encoders import torch_bert
from bert_recsys.export.source import SourceModel

MODULE = Path(torch_bert.__file__)
DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16}


def bert_config(source: SourceModel) -> torch_bert.BertConfig:
    config = json.loads((source.transformer_path / "config.json").read_text())
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise torch_bert.WeightsError(f"position embeddings {config['position_embedding_type']!r}: only absolute")
    return torch_bert.BertConfig(
        hidden=int(config["hidden_size"]), heads=int(config["num_attention_heads"]),
        layers=int(config["num_hidden_layers"]), intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]), max_positions=int(config["max_position_embeddings"]),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)), activation=config.get("hidden_act", "gelu"),
        pooling=source.pooling)


def write(encoder, source: SourceModel, precision: Precision, path: Path) -> dict:
    """`encoder` is the PyTorch FP32 reference (export.onnx_export.SentenceEncoder): its BERT's weights."""
    config = bert_config(source)
    weights = torch_bert.from_transformers_state(encoder.bert.state_dict(), config)
    torch_bert.save(path, config, weights, DTYPES[precision])
    return {"module": "encoders/torch_bert.py", "format": torch_bert.FORMAT, "weights_dtype": str(DTYPES[precision]),
            "attention": "scaled_dot_product_attention"}


def gate_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchBertRunner:
    """The gate's runner: encoders/torch_bert.py at the variant's precision, on `device`."""

    def __init__(self, path: Path, precision: Precision, device: str | None = None, name: str | None = None):
        self.device = torch.device(device or gate_device())
        self.dtype = DTYPES[precision]
        self.model = torch_bert.load(path, self.device, self.dtype)
        self.name = name or Path(path).parent.name

    def describe(self) -> dict:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"gate_device": where, "compute_dtype": str(self.dtype)}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            return self.model(ids, mask).float().cpu().numpy()
