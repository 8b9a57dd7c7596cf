"""The variants `export` can make. A variant is a format and a precision; its name is what users type."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    format: str      # "onnx" or "tensorrt_plan"
    precision: str   # "fp32", "fp16" or "int8": picks the gate thresholds

    @property
    def artifact(self) -> str:
        return "model.onnx" if self.format == "onnx" else "model.plan"

    @property
    def needs_tensorrt(self) -> bool:
        return self.format == "tensorrt_plan"


VARIANTS = {
    v.name: v
    for v in (
        Variant("onnx-fp32", "onnx", "fp32"),
        Variant("onnx-fp16", "onnx", "fp16"),
        Variant("onnx-int8", "onnx", "int8"),
        Variant("trt-fp16", "tensorrt_plan", "fp16"),
        Variant("trt-int8", "tensorrt_plan", "int8"),
    )
}
DEFAULT_VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "trt-fp16", "trt-int8")


def parse_variants(text: str) -> list[Variant]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not names:
        raise ValueError("no variant requested")
    return [VARIANTS[n] for n in names]
