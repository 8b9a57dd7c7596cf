"""Which runtime serves the encoder. The renderer writes it; a live repository's config says it back."""
from __future__ import annotations

from enum import StrEnum


class Runtime(StrEnum):
    EMBEDDED = "embedded"  # Python backend running ONNX Runtime: the pip-installed tritonserver
    NATIVE = "native"      # Triton's own onnxruntime_onnx / tensorrt_plan backends: the NGC image

    @classmethod
    def parse(cls, text: str) -> "Runtime":
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"unknown runtime {text!r}; choose from {', '.join(r.value for r in cls)}") from None

    @classmethod
    def of_encoder_config(cls, backend: str, platform: str) -> "Runtime":
        """From a rendered encoder config: the embedded runtime is the Python backend; anything else is native."""
        return cls.EMBEDDED if backend == "python" else cls.NATIVE
