"""PyTorch -> ONNX, then the graph transforms that make each ONNX variant.

The exported graph is the whole sentence encoder: BERT, pooling and L2 normalization. Its output is the
final embedding, so every runtime (ORT, TensorRT, torch) serves exactly the same function.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch

from bert_recsys.export.source import SourceModel

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


@contextlib.contextmanager
def quieter(name: str | None = None, level: int = logging.ERROR):
    """A logger (the root one by default: ONNX Runtime's quantizer logs through it) at `level` for the block, then
    back where it was: the export never leaves the caller's logging changed."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def attention_nodes(model_path: Path) -> list[str]:
    """Names of the fused Attention nodes (QKV projection + attention) of an ORT-fused graph."""
    return sorted(n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node
                  if n.op_type == "Attention")


def quantize_int8_dynamic(fp32_path: Path, out_path: Path, exclude_nodes: list[str]) -> dict:
    """Per-channel dynamic INT8: weights quantized offline, activations per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quieter():  # silences "please run pre-processing" chatter
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude_nodes,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {"mode": "dynamic", "per_channel": True, "weight_type": "QInt8", "fp32_nodes": exclude_nodes}


def _per_row_int8_matmul(prefix: str, x: str, y: str, weight: np.ndarray) -> tuple[list, list]:
    """Nodes and initializers computing y = x @ weight with INT8 weights (per output channel, symmetric) and INT8
    activations quantized per row, i.e. per token, at run time: a token's scale depends on that token only, so
    the result does not depend on what else is in the batch (or on padding). x: [..., K] -> y: [..., N]."""
    from onnx import helper, numpy_helper

    k, n = weight.shape
    w_scale = np.maximum(np.abs(weight).max(axis=0), 1e-8) / 127.0
    w_q = np.clip(np.round(weight / w_scale), -127, 127).astype(np.int8)
    p = prefix
    inits = [numpy_helper.from_array(w_q, p + "w_q"), numpy_helper.from_array(w_scale.astype(np.float32), p + "w_scale"),
             numpy_helper.from_array(np.array([-1, k], np.int64), p + "rows"),
             numpy_helper.from_array(np.array([n], np.int64), p + "n")]
    node = helper.make_node
    nodes = [
        node("Reshape", [x, p + "rows"], [p + "x2"]),                           # [R, K], one row per token
        node("Abs", [p + "x2"], [p + "abs"]),
        node("ReduceMax", [p + "abs"], [p + "absmax"], axes=[1], keepdims=0),   # [R]
        node("Max", [p + "absmax", _PER_ROW + "eps"], [p + "absmax_eps"]),
        node("Mul", [p + "absmax_eps", _PER_ROW + "inv127"], [p + "scale"]),     # symmetric: [-127, 127] + 128
        node("Shape", [p + "scale"], [p + "rows_n"]),
        node("Expand", [_PER_ROW + "zero_point", p + "rows_n"], [p + "zero_points"]),
        node("QuantizeLinear", [p + "x2", p + "scale", p + "zero_points"], [p + "x_q"], axis=0),
        # (x_q - 128) @ w_q * w_scale in one pass over the output: the per-column weight scale goes in as
        # b_scale; the per-row activation scale is not a form the op takes, so it is the Mul after.
        node("MatMulIntegerToFloat", [p + "x_q", p + "w_q", _PER_ROW + "one", p + "w_scale", _PER_ROW + "zero_point"],
             [p + "y_cols"], domain="com.microsoft"),
        node("Reshape", [p + "scale", _PER_ROW + "column"], [p + "scale_col"]),  # [R, 1]
        node("Mul", [p + "y_cols", p + "scale_col"], [p + "y2"]),
        node("Shape", [x], [p + "x_shape"]),
        node("Slice", [p + "x_shape", _PER_ROW + "zero", _PER_ROW + "minus_one"], [p + "lead"]),
        node("Concat", [p + "lead", p + "n"], [p + "y_shape"], axis=0),
        node("Reshape", [p + "y2", p + "y_shape"], [y]),
    ]
    return nodes, inits


_PER_ROW = "per_row_int8/"
# The per-row graph's layout, part of the INT8 recipe (export.pipeline), so a change to it re-exports and re-gates.
# 2: MatMulIntegerToFloat + one row-scale Mul, where 1 had MatMulInteger, DequantizeLinear and a Mul: one pass
# less over every GEMM's output. On a 2-core AVX2 EPYC, A/B in turns: b32/s128 -5.3% (-2.4% in a shorter run),
# b1/s16 +1% (0.03 ms). max |x| as max(ReduceMax, -ReduceMin) instead of Abs + ReduceMax saved another 1-2% at
# b32 but cost 2-3% at b1/s16, so it was left out.
PER_ROW_GRAPH = 2


def quantize_int8_per_row(fp32_path: Path, out_path: Path, exclude_nodes: list[str]) -> dict:
    """Batch-invariant dynamic INT8 for the ORT-fused graph: every MatMul with constant weights, and the QKV
    projection of every fused Attention (which becomes that projection + MultiHeadAttention), run with
    per-channel INT8 weights and per-token INT8 activations. ORT's dynamic quantizer uses one activation scale
    for the whole batch instead, so a text's vector depends on its batch-mates (min cosine ~0.96 here)."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    excluded = set(exclude_nodes)
    nodes, added, replaced = [], [], []
    for index, n in enumerate(graph.node):
        weight = initializers.get(n.input[1]) if len(n.input) > 1 else None
        if weight is None or n.name in excluded or n.op_type not in ("MatMul", "Attention"):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        prefix = f"{_PER_ROW}{index}/"
        if n.op_type == "MatMul":
            new, inits = _per_row_int8_matmul(prefix, n.input[0], n.output[0], w)
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if set(attrs) - {"num_heads", "mask_filter_value"} or len(n.input) != 4:
                nodes.append(n)  # past state, unidirectional, qkv_hidden_sizes...: not a BERT encoder's attention
                continue
            new, inits = _per_row_int8_matmul(prefix, n.input[0], prefix + "qkv", w)
            third = w.shape[1] // 3
            inits.append(numpy_helper.from_array(np.array([third] * 3, np.int64), prefix + "split"))
            new += [helper.make_node("Split", [prefix + "qkv", prefix + "split"],
                                     [prefix + "q", prefix + "k", prefix + "v"], axis=-1),
                    # The bias and the mask index go in as the fused op had them.
                    helper.make_node("MultiHeadAttention", [prefix + "q", prefix + "k", prefix + "v", n.input[2],
                                                            n.input[3]], list(n.output), name=n.name + "/mha",
                                     domain="com.microsoft", num_heads=attrs["num_heads"],
                                     mask_filter_value=attrs.get("mask_filter_value", -10000.0))]
        graph.initializer.remove(weight)
        nodes += new
        added += inits
        replaced.append(n.name)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # MatMulIntegerToFloat is ORT's
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(1e-10, np.float32), _PER_ROW + "eps"),
        numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), _PER_ROW + "inv127"),
        numpy_helper.from_array(np.array(1.0, np.float32), _PER_ROW + "one"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), _PER_ROW + "column"),
        numpy_helper.from_array(np.array(128, np.uint8), _PER_ROW + "zero_point"),
        numpy_helper.from_array(np.array([0], np.int64), _PER_ROW + "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), _PER_ROW + "minus_one"),
        *added])
    onnx.save(model, str(out_path))
    return {"mode": "per-row", "weights": "INT8 per output channel, symmetric",
            "activations": "INT8 per token (row), symmetric, at run time", "int8_nodes": len(replaced),
            "fp32_nodes": sorted(excluded)}


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

    with quieter():
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
