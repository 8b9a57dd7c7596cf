"""The variants `export` can make. A variant is a format and a precision; its name is what users type."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bert_recsys.contracts.manifest import Precision, VariantFormat


class VariantStatus(StrEnum):
    """What one export run did with a variant."""

    WRITTEN = "written"        # built, passed the gate, in place
    UP_TO_DATE = "up-to-date"  # the same recipe already passed: nothing rebuilt
    REFUSED = "refused"        # failed the gate: kept under refused/ for inspection, never served
    SKIPPED = "skipped"        # cannot be built here (TensorRT outside the NGC image)
    FAILED = "failed"          # the build itself broke (a full disk, a converter crash)


@dataclass(frozen=True)
class Variant:
    name: str
    format: VariantFormat
    precision: Precision   # picks the gate thresholds
    # OpenVINO only: the precision its CPU plugin computes the unquantized ops in (f32 or bf16); None: the
    # precision's own (export/openvino_variant.py INFERENCE_PRECISION).
    inference_precision: str | None = None

    @property
    def artifact(self) -> str:
        return {VariantFormat.ONNX: "model.onnx", VariantFormat.TENSORRT_PLAN: "model.plan",
                VariantFormat.TORCH: "model.safetensors", VariantFormat.OPENVINO: "model.xml"}[self.format]

    @property
    def needs_tensorrt(self) -> bool:
        return self.format == VariantFormat.TENSORRT_PLAN


VARIANTS = {
    v.name: v
    for v in (
        Variant("onnx-fp32", VariantFormat.ONNX, Precision.FP32),
        Variant("onnx-fp16", VariantFormat.ONNX, Precision.FP16),
        Variant("onnx-int8", VariantFormat.ONNX, Precision.INT8),
        Variant("trt-fp16", VariantFormat.TENSORRT_PLAN, Precision.FP16),
        Variant("trt-int8", VariantFormat.TENSORRT_PLAN, Precision.INT8),
        # The torch runtime (RUNTIME=torch): FP16 for GPUs, FP32 for CPUs and as the exact reference.
        Variant("torch-fp32", VariantFormat.TORCH, Precision.FP32),
        Variant("torch-fp16", VariantFormat.TORCH, Precision.FP16),
        # OpenVINO (export/openvino_variant.py): served by the embedded runtime too, or Triton's openvino backend.
        Variant("ov-fp32", VariantFormat.OPENVINO, Precision.FP32),
        Variant("ov-int8", VariantFormat.OPENVINO, Precision.INT8),
        Variant("ov-bf16", VariantFormat.OPENVINO, Precision.BF16),  # only where the CPU computes BF16 natively
        # ov-int8's recipe (no FFN layer kept FP32, export.pipeline.OV_INT8_FP32_LAYERS) with what stays
        # unquantized (attention core, norms, GELU) computed in BF16: only where the CPU computes BF16; gated as INT8.
        Variant("ov-int8-bf16", VariantFormat.OPENVINO, Precision.INT8, inference_precision="bf16"),
    )
}
# Every runtime and precision the embedded runtime serves on a CPU: what `make tune`, `make bench` and
# `make bench-peers` export and measure (the Makefile's CPU_VARIANTS, kept equal by a unit test). ov-bf16 and
# ov-int8-bf16 are skipped, and listed as not supported, where the CPU computes no BF16.
CPU_VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "ov-fp32", "ov-int8", "ov-bf16", "ov-int8-bf16")
DEFAULT_VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "ov-fp32", "ov-int8", "ov-bf16", "ov-int8-bf16", "trt-fp16",
                    "trt-int8")


def parse_variants(text: str) -> list[Variant]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not names:
        raise ValueError("no variant requested")
    return [VARIANTS[n] for n in names]
