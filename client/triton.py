"""The only place that talks to Triton: `embed` and `score` over HTTP or gRPC, with bounded retries.

Tensor and model names come from `settings.SETTINGS`, the same object the repository is rendered from.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tritonclient.utils import InferenceServerException

import settings as settings_module
from settings import Settings

PROTOCOLS = ("grpc", "http")
# Status strings tritonclient reports for "try again later" (gRPC codes and HTTP statuses).
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "503", "429", "502", "504")
INVALID = ("INVALID_ARGUMENT", "400", "NOT_FOUND", "404")


class ServingError(RuntimeError):
    """Triton is down or overloaded and stayed so through every retry."""


class InvalidRequest(ValueError):
    """Triton rejected the request itself (bad text, wrong shape, unknown model): retrying cannot help."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def delays(self):
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_backoff_s)


def _status(error: Exception) -> str:
    status = error.status() if isinstance(error, InferenceServerException) else None
    return str(status or "")


def _is_retryable(error: Exception) -> bool:
    if isinstance(error, InferenceServerException):
        status = _status(error)
        text = str(error)
        # Connection refused/reset show up without a status, or as UNAVAILABLE.
        if any(code in status for code in RETRYABLE):
            return True
        return (not status and "Connect" in text) or "unavailable" in text.lower()
    return isinstance(error, (ConnectionError, OSError))


class TritonClient:
    def __init__(self, url: str | None = None, protocol: str = "grpc", settings: Settings | None = None,
                 retry: RetryPolicy = RetryPolicy(), timeout_s: float = 30.0):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        self.settings = settings or settings_module.SETTINGS
        server = self.settings.server
        self.protocol = protocol
        self.url = url or (server.grpc_url if protocol == "grpc" else server.http_url)
        self.retry = retry
        self.timeout_s = timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self._local = threading.local()  # one connection per thread: safe for both protocols

    @property
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url)
            else:
                client = self._module.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                            network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing ----------------------------------------------------------------------------------
    def _call(self, what: str, fn):
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except Exception as error:  # tritonclient raises its own and transport exceptions
                if not _is_retryable(error):
                    if isinstance(error, InferenceServerException) and any(c in _status(error) for c in INVALID):
                        raise InvalidRequest(f"{what}: {error.message()}") from None
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise ServingError(f"{what} failed after {self.retry.attempts} attempts: {error}") from None
                self.close()  # a fresh connection for the next attempt
                time.sleep(delay)

    def _input(self, name: str, array: np.ndarray, dtype: str):
        tensor = self._module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _infer(self, model: str, inputs: list, outputs: list[str], version: str = "") -> dict[str, np.ndarray]:
        def call():
            requested = [self._module.InferRequestedOutput(name) for name in outputs]
            kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self._client.infer(model, inputs, outputs=requested, model_version=version, **kwargs)
            return {name: result.as_numpy(name) for name in outputs}

        return self._call(f"infer {model}", call)

    @staticmethod
    def _texts(texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        return np.array([[t.encode("utf-8")] for t in texts], dtype=object)

    # ---- public API --------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], version: str = "") -> np.ndarray:
        """One request: texts -> L2-normalized embeddings [len(texts), D]."""
        t = self.settings.tensors
        batch = self._texts(texts)
        out = self._infer(self.settings.models.embed, [self._input(t.text, batch, "BYTES")], [t.embedding], version)
        return out[t.embedding]

    def embed_many(self, texts: Sequence[str], batch_size: int | None = None, concurrency: int = 4,
                   progress: str | None = None) -> np.ndarray:
        """Many texts: batched requests, `concurrency` in flight, results in input order."""
        from tqdm import tqdm

        size = batch_size or self.settings.batching.max_batch_size
        chunks = [list(texts[i : i + size]) for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            parts = list(tqdm(pool.map(self.embed, chunks), total=len(chunks), desc=progress,
                              disable=None if progress else True, unit="batch"))
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def score(self, texts: Sequence[str], candidates: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Cosine of each query text against its own candidates: candidates [len(texts), k, D].
        Returns {"SCORES": [n, k], "QUERY_EMBEDDING": [n, D]} (or the subset asked for)."""
        t = self.settings.tensors
        candidates = np.ascontiguousarray(candidates, dtype=np.float32)
        if candidates.ndim == 2:
            candidates = np.broadcast_to(candidates, (len(texts), *candidates.shape)).copy()
        inputs = [self._input(t.text, self._texts(texts), "BYTES"), self._input(t.candidates, candidates, "FP32")]
        return self._infer(self.settings.models.score, inputs, list(outputs or (t.scores, t.query_embedding)))

    def encoder_info(self) -> dict[str, str]:
        """The export serving behind `encoder`: variant, manifest and artifact hashes (from its config)."""
        def call():
            config = self._client.get_model_config(self.settings.models.encoder)
            if self.protocol == "grpc":
                params = {k: v.string_value for k, v in config.config.parameters.items()}
            else:
                params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
            return {k: v for k, v in params.items() if k.startswith("export_")}

        return self._call("get encoder config", call)

    def ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:
            return False
