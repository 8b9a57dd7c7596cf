"""PyTorch -> ONNX, then the graph transforms that make each ONNX variant.

The exported graph is the whole sentence encoder: BERT, pooling and L2 normalization. Its output is the
final embedding, so every runtime (ORT, TensorRT, torch) serves exactly the same function.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

from export.source import SourceModel

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
# Names of the pooling/normalization nodes start with this; FP16 keeps them in FP32.
POOL_SCOPE = "/pool/"
# Ops that stay FP32 in the FP16 variant: normalization statistics overflow or lose precision in FP16.
FP16_BLOCKED_OPS = ["LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "Softmax"]


class Pooling(torch.nn.Module):
    """sentence-transformers pooling followed by L2 normalization."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


class SentenceEncoder(torch.nn.Module):
    """BERT + pooling + normalization: (input_ids, attention_mask) -> embedding [batch, dim]."""

    def __init__(self, bert: torch.nn.Module, pooling: str):
        super().__init__()
        self.bert = bert
        self.pool = Pooling(pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.pool(hidden, attention_mask)


def load_torch_encoder(source: SourceModel, attn_implementation: str = "eager") -> SentenceEncoder:
    """The PyTorch FP32 reference. Eager attention exports as plain MatMul/Softmax, which ORT fuses."""
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(
        source.transformer_path, attn_implementation=attn_implementation, torch_dtype=torch.float32
    )
    return SentenceEncoder(bert, source.pooling).eval()


def export_raw_onnx(encoder: SentenceEncoder, path: Path) -> None:
    """TorchScript-based exporter: its graph is the one ORT's BERT fusions recognise."""
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    axes = {"batch": 0, "sequence": 1}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (ids, mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAMES[0]: {axes["batch"]: "batch", axes["sequence"]: "sequence"},
                INPUT_NAMES[1]: {axes["batch"]: "batch", axes["sequence"]: "sequence"},
                OUTPUT_NAME: {axes["batch"]: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def optimize_fp32(raw_path: Path, out_path: Path, source: SourceModel) -> dict:
    """ORT transformer optimizer: fuses Attention, SkipLayerNorm, Gelu, embedding LayerNorm."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(raw_path),
        model_type="bert",
        num_heads=source.num_heads,
        hidden_size=source.dim,
        opt_level=1,  # graph fusions only; level 2+ would bake CPU-specific layouts into the file
    )
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    if not fused.get("Attention"):
        raise RuntimeError(f"attention was not fused ({fused}); export with attn_implementation='eager'")
    model.save_model_to_file(str(out_path))
    return fused


def convert_fp16(fp32_path: Path, out_path: Path) -> dict:
    """FP16 weights and activations; normalization and the pooling tail stay FP32; I/O stays FP32."""
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    model = BertOnnxModel(onnx.load(str(fp32_path)))
    pooling_nodes = [n.name for n in model.model.graph.node if n.name.startswith(POOL_SCOPE)]
    model.convert_float_to_float16(
        keep_io_types=True, op_block_list=FP16_BLOCKED_OPS, node_block_list=pooling_nodes
    )
    model.save_model_to_file(str(out_path))
    return {"fp32_ops": FP16_BLOCKED_OPS, "fp32_nodes": len(pooling_nodes)}


def ffn_output_matmuls(model_path: Path, layers: Iterable[int]) -> list[str]:
    """Names of the FFN down-projection MatMuls of the given layers: the activations after GELU have the
    widest range in BERT, so these are the first candidates to keep in FP32."""
    wanted = {f"/bert/encoder/layer.{i}/output/dense/MatMul" for i in layers}
    names = [n.name for n in onnx.load(str(model_path)).graph.node if n.name in wanted]
    return sorted(names)


def quantize_int8_dynamic(fp32_path: Path, out_path: Path, exclude_nodes: list[str]) -> dict:
    """Per-channel dynamic INT8: weights quantized offline, activations per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # silences "please run pre-processing" chatter
    quantize_dynamic(
        str(fp32_path),
        str(out_path),
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude_nodes,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return {"mode": "dynamic", "per_channel": True, "weight_type": "QInt8", "fp32_nodes": exclude_nodes}


def quantize_int8_static(
    fp32_path: Path, out_path: Path, batches: list[dict[str, np.ndarray]], exclude_nodes: list[str]
) -> dict:
    """Calibrated static INT8 in QDQ format (what TensorRT's explicit INT8 consumes too)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(batches)

    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(
        str(fp32_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude_nodes,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "DefaultTensorType": onnx.TensorProto.FLOAT,
        },
    )
    return {
        "mode": "static",
        "format": "QDQ",
        "per_channel": True,
        "calibration": "minmax",
        "calibration_batches": len(batches),
        "fp32_nodes": exclude_nodes,
    }
