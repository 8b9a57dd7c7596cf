"""Which runtime serves the encoder. The renderer writes it; a live repository's config says it back."""
from __future__ import annotations

from enum import StrEnum


class Runtime(StrEnum):
    EMBEDDED = "embedded"  # Python backend running ONNX Runtime: the pip-installed tritonserver
    NATIVE = "native"      # Triton's own onnxruntime_onnx / tensorrt_plan backends: the NGC image
    TORCH = "torch"        # Python backend running torch (encoders/torch_bert.py): CUDA when present, else CPU

    @classmethod
    def parse(cls, text: str) -> "Runtime":
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"unknown runtime {text!r}; choose from {', '.join(r.value for r in cls)}") from None

    @classmethod
    def of_encoder_config(cls, backend: str, platform: str, declared: str = "") -> "Runtime":
        """From a rendered encoder config: its `runtime` parameter when it has one; configs rendered before that
        parameter existed are embedded (Python backend) or native (anything else)."""
        if declared:
            return cls.parse(declared)
        return cls.EMBEDDED if backend == "python" else cls.NATIVE


def runtime_formats() -> dict:
    """The variant formats each runtime can serve (the renderer refuses the others; tune measures the embedded ones)."""
    from bert_recsys.contracts.manifest import VariantFormat

    return {Runtime.EMBEDDED: {VariantFormat.ONNX, VariantFormat.OPENVINO}, Runtime.TORCH: {VariantFormat.TORCH},
            Runtime.NATIVE: {VariantFormat.ONNX, VariantFormat.TENSORRT_PLAN, VariantFormat.OPENVINO}}
