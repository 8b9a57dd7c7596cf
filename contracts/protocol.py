"""How a client reaches Triton: its two wire protocols, by name."""
from __future__ import annotations

from enum import StrEnum


class Protocol(StrEnum):
    GRPC = "grpc"
    HTTP = "http"

    @classmethod
    def parse(cls, text: str) -> "Protocol":
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise ValueError(f"protocol must be one of {', '.join(p.value for p in cls)}, not {text!r}") from None
