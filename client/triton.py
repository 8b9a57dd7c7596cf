"""The only place that talks to Triton: `embed` and `score` over HTTP or gRPC, with bounded retries.

Tensor and model names come from `settings.SETTINGS`, the same object the repository is rendered from.

Versions (rollout/): `embed`/`score` serve the stable encoder version; `embed_v<N>`/`score_v<N>` are pinned
to version N. A call may name its `encoder_version` (a catalog index embedded by version N must query with
N), or leave it to the client, which then sends `canary_share` of its calls to a canary version while a
rollout runs one. Which versions exist is read from the encoder's config (not a restricted API).
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bert_recsys import settings as settings_module
from bert_recsys.client.errors import (InvalidRequest, Kind, ModelNotFound, ServingError, ServingTimeout, Unavailable, classify,
                           message, status_code)
from bert_recsys.contracts.protocol import Protocol
from bert_recsys.settings import Settings

PROTOCOLS = tuple(Protocol)
__all__ = ["TritonClient", "AsyncTritonClient", "RetryPolicy", "ServingView", "ServingError", "ServingTimeout", "Unavailable",
           "InvalidRequest", "ModelNotFound"]


# gRPC reconnects to a server that went away with an exponential backoff that grows to 120 s, and fails calls
# fast in between: a Triton restarted after 10 s of downtime could stay unreachable through this client for many
# seconds more. Capped at 2 s, a restarted server is found again within about 2 s.
RECONNECT_BACKOFF_MS = (250, 2000)


def grpc_channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel options (message size, keepalive), plus a capped reconnect backoff."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keepalive = KeepAliveOptions()
    first, most = RECONNECT_BACKOFF_MS
    return [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", first),
            ("grpc.min_reconnect_backoff_ms", first),
            ("grpc.max_reconnect_backoff_ms", most)]


@dataclass(frozen=True)
class ServingView:
    """What the server serves, from the encoder's config: the stable version, every loaded version and
    each one's export parameters (variant, manifest hash...). A version above `stable` is a canary."""

    stable: int
    versions: tuple[int, ...]
    exports: dict

    @classmethod
    def from_config(cls, params: dict[str, str], versions: list) -> "ServingView":
        """From the encoder config's string parameters and its `specific` version list."""
        stable = int(params.get("export_version", 1))
        versions = tuple(sorted(int(v) for v in versions)) or (stable,)
        exports = {}
        for version in versions:
            prefix = f"export_v{version}_"
            own = {"export_" + k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
            exports[version] = own or {k: v for k, v in params.items() if k.startswith("export_") and k != "export_version"}
        return cls(stable, versions, exports)

    @classmethod
    def from_model_config(cls, config) -> "ServingView":
        """From tritonclient's answer to get_model_config: the gRPC response, or the HTTP JSON dict."""
        if isinstance(config, dict):
            params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
            return cls.from_config(params, config.get("version_policy", {}).get("specific", {}).get("versions", []))
        config = config.config
        return cls.from_config({k: v.string_value for k, v in config.parameters.items()},
                               list(config.version_policy.specific.versions))

    @property
    def canary(self) -> int | None:
        newer = [v for v in self.versions if v > self.stable]
        return max(newer) if newer else None

    def export(self, version: int | None = None) -> dict[str, str]:
        """The export_* parameters of one version (default: the stable one), with its number."""
        version = self.stable if version is None else version
        if version not in self.exports:
            raise ModelNotFound(f"encoder version {version} is not loaded (loaded: {list(self.versions)})")
        return {**self.exports[version], "export_version": str(version)}


def failure(what: str, error: BaseException, timeout_s: float, attempts: int, retry_left: bool) -> BaseException | None:
    """What a failed call raises: one of client.errors' types, `error` itself when it is not tritonclient's or
    a transport's, or None when it may be retried (a down or overloaded server) and retries are left."""
    kind = classify(error)
    if kind is Kind.FOREIGN:
        return error
    if kind is Kind.TIMEOUT:
        return ServingTimeout(f"{what}: no answer within {timeout_s:g} s (not retried: the server may still be "
                              "working on it)")
    if kind is Kind.NOT_FOUND:
        return ModelNotFound(f"{what}: {message(error)}")
    if kind is Kind.INVALID:
        return InvalidRequest(f"{what}: {message(error)}")
    if kind is Kind.FAILED:  # the server failed it (e.g. a dead stub)
        return ServingError(f"{what}: {status_code(error)}: {message(error)}")
    if retry_left:
        return None
    return Unavailable(f"{what} failed after {attempts} attempts: "
                       f"{status_code(error) or type(error).__name__}: {message(error)}")


def canary_version(view: ServingView | None, share: float, draw: float) -> int | None:
    """The version an unpinned call goes to: the canary for a `draw` in [0, 1) below `share` while one is
    loaded, else None (the stable version, through the unpinned ensemble)."""
    if view is None or share <= 0 or draw >= share:
        return None
    return view.canary


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


# A call sent to the canary gets one attempt there; if the canary fails it (or is gone), the same call goes to the
# stable version with the usual retries. The caller sees a success, and Triton's metrics keep the canary's failure
# for the rollout's verdict (rollout/policy.py); a canary that answers too late shows there in its latency.
CANARY_ATTEMPT = RetryPolicy(attempts=1)
# What sends a call that failed on the canary to the stable version: whatever Triton answered (the canary failed
# it, timed out, was unreachable, is no longer loaded, or refused the request: a canary with another export may
# refuse what the stable version accepts), but not a bug of the caller's own (any other exception).
CANARY_FALLBACK = (ServingError, InvalidRequest)


def length_batches(texts: Sequence[str], size: int) -> list[np.ndarray]:
    """Indexes of `texts` in batches of at most `size`, longest texts first (by characters, a close enough
    proxy for tokens), so each batch pads to a length near its own texts'. Every index appears exactly once."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    order = np.argsort([-len(text) for text in texts], kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]


class TritonClient:
    def __init__(self, url: str | None = None, protocol: Protocol | str = Protocol.GRPC, settings: Settings | None = None,
                 retry: RetryPolicy = RetryPolicy(), timeout_s: float = 30.0, canary_share: float = 0.0,
                 view_ttl_s: float = 2.0):
        protocol = Protocol.parse(protocol)
        self.settings = settings or settings_module.SETTINGS
        server = self.settings.server
        self.protocol = protocol
        self.url = url or (server.grpc_url if protocol is Protocol.GRPC else server.http_url)
        self.retry = retry
        self.timeout_s = timeout_s
        if protocol is Protocol.GRPC:
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self._local = threading.local()  # one connection per thread: safe for both protocols
        if not 0.0 <= canary_share <= 1.0:
            raise ValueError(f"canary_share must be within [0, 1], not {canary_share}")
        self.canary_share = canary_share
        self.view_ttl_s = view_ttl_s
        self._view: tuple[float, ServingView] | None = None
        self._dim: int | None = None  # D, read once from the `embed` config (embedding_dim)

    @property
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol is Protocol.GRPC:
                client = self._module.InferenceServerClient(self.url, channel_args=grpc_channel_args())
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
    def _call(self, what: str, fn, retry: RetryPolicy | None = None):
        """Runs one tritonclient call with retries; every failure leaves as one of client.errors' types."""
        retry = retry or self.retry
        delays = retry.delays()
        while True:
            try:
                return fn()
            except Exception as error:  # tritonclient raises its own and transport exceptions
                delay = next(delays, None)
                typed = failure(what, error, self.timeout_s, retry.attempts, retry_left=delay is not None)
                if typed is error:
                    raise
                if isinstance(typed, ServingTimeout) or typed is None:
                    self.close()  # a late answer may still come on this connection; retries get a fresh one
                if typed is not None:
                    raise typed from None
                time.sleep(delay)

    def _input(self, name: str, array: np.ndarray, dtype: str):
        tensor = self._module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _infer(self, model: str, inputs: list, outputs: list[str], version: str = "",
               retry: RetryPolicy | None = None) -> dict[str, np.ndarray]:
        def call():
            requested = [self._module.InferRequestedOutput(name) for name in outputs]
            kwargs = {"client_timeout": self.timeout_s} if self.protocol is Protocol.GRPC else {}
            result = self._client.infer(model, inputs, outputs=requested, model_version=version, **kwargs)
            return {name: result.as_numpy(name) for name in outputs}

        return self._call(f"infer {model}", call, retry)

    @staticmethod
    def _texts(texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        return np.array([[t.encode("utf-8")] for t in texts], dtype=object)

    # ---- versions and routing ----------------------------------------------------------------------
    def serving_view(self, max_age_s: float | None = None) -> ServingView:
        """The encoder's versions, read from its config at most every `view_ttl_s` seconds."""
        max_age = self.view_ttl_s if max_age_s is None else max_age_s
        now = time.monotonic()
        if self._view is not None and now - self._view[0] <= max_age:
            return self._view[1]

        kwargs = {"client_timeout": self.timeout_s} if self.protocol is Protocol.GRPC else {}
        config = self._call("get encoder config",
                            lambda: self._client.get_model_config(self.settings.models.encoder, **kwargs))
        view = ServingView.from_model_config(config)
        self._view = (now, view)
        return view

    def _route(self, ensemble: str, encoder_version: int | None) -> tuple[str, str | None]:
        """-> (model to call, fallback model if that one is gone). Pinned calls never fall back: a caller
        that pinned a version must not silently get vectors from another one."""
        if encoder_version is not None:
            return self.settings.models.pinned(ensemble, encoder_version), None
        draw = random.random()
        canary = canary_version(self.serving_view(), self.canary_share, draw) if draw < self.canary_share else None
        if canary is not None:
            return self.settings.models.pinned(ensemble, canary), ensemble
        return ensemble, None

    def _infer_routed(self, ensemble: str, encoder_version: int | None, inputs: list, outputs: list[str]):
        model, fallback = self._route(ensemble, encoder_version)
        if fallback is None:
            return self._infer(model, inputs, outputs)
        try:
            return self._infer(model, inputs, outputs, retry=CANARY_ATTEMPT)
        except CANARY_FALLBACK as error:
            if isinstance(error, ModelNotFound):
                self._view = None  # promoted or rolled back since our view of it
            return self._infer(fallback, inputs, outputs)

    # ---- public API --------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], encoder_version: int | None = None) -> np.ndarray:
        """One request: texts -> L2-normalized embeddings [len(texts), D], from the stable encoder (or a
        canary, see `canary_share`), or from `encoder_version` when given."""
        t = self.settings.tensors
        batch = self._texts(texts)
        out = self._infer_routed(self.settings.models.embed, encoder_version, [self._input(t.text, batch, "BYTES")],
                                 [t.embedding])
        return out[t.embedding]

    def embed_many(self, texts: Sequence[str], batch_size: int | None = None, concurrency: int = 4,
                   progress: str | None = None, encoder_version: int | None = None) -> np.ndarray:
        """Many texts: batched requests, `concurrency` in flight, results in input order.

        The texts are sent longest first, in batches of similar length (`length_batches`): the tokenizer pads a
        batch to its longest text, so batches in input order spend most of their time on padding when short and
        long texts are mixed (titles without an overview beside full synopses)."""
        from tqdm import tqdm

        size = batch_size or self.settings.batching.max_batch_size
        chunks = length_batches(texts, size)
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            parts = list(tqdm(pool.map(lambda chunk: self.embed([texts[i] for i in chunk], encoder_version), chunks),
                              total=len(chunks), desc=progress, disable=None if progress else True, unit="batch"))
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        out = np.empty((len(texts), parts[0].shape[1]), dtype=parts[0].dtype)
        for chunk, part in zip(chunks, parts):
            out[chunk] = part
        return out

    def score(self, texts: Sequence[str], candidates: np.ndarray, outputs: Sequence[str] | None = None,
              encoder_version: int | None = None) -> dict[str, np.ndarray]:
        """Cosine of each query text against its own candidates: candidates [len(texts), k, D].
        Returns {"SCORES": [n, k], "QUERY_EMBEDDING": [n, D]} (or the subset asked for). Candidates from a
        catalog index should pass the index's `encoder_version`, so the query is encoded by the same one."""
        t = self.settings.tensors
        candidates = np.ascontiguousarray(candidates, dtype=np.float32)
        if candidates.ndim == 2:
            candidates = np.broadcast_to(candidates, (len(texts), *candidates.shape)).copy()
        inputs = [self._input(t.text, self._texts(texts), "BYTES"), self._input(t.candidates, candidates, "FP32")]
        return self._infer_routed(self.settings.models.score, encoder_version, inputs,
                                  list(outputs or (t.scores, t.query_embedding)))

    def encoder_info(self, encoder_version: int | None = None) -> dict[str, str]:
        """The export behind the stable encoder version (or `encoder_version`): its number, variant, manifest
        and artifact hashes, as `export_*` keys (read fresh, not from the cached view)."""
        return self.serving_view(max_age_s=0).export(encoder_version)

    def ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:
            return False

    def model_ready(self, model: str | None = None, timeout_s: float | None = None) -> bool:
        """Whether Triton reports `model` (default: the public `embed`) ready; False when unreachable (or, over
        gRPC, when it does not answer within `timeout_s`)."""
        kwargs = {"client_timeout": timeout_s} if timeout_s is not None and self.protocol is Protocol.GRPC else {}
        try:
            return bool(self._client.is_model_ready(model or self.settings.models.embed, **kwargs))
        except Exception:
            return False

    def embedding_dim(self) -> int:
        """D, from the `embed` ensemble's output in its config (read once)."""
        if self._dim is None:
            kwargs = {"client_timeout": self.timeout_s} if self.protocol is Protocol.GRPC else {}
            config = self._call("get embed config",
                                lambda: self._client.get_model_config(self.settings.models.embed, **kwargs))
            outputs = config["output"] if isinstance(config, dict) else config.config.output
            dims = outputs[0]["dims"] if isinstance(outputs[0], dict) else outputs[0].dims
            self._dim = int(dims[-1])
        return self._dim


class AsyncTritonClient:
    """`embed` for callers that run on an event loop (the gateway): no thread per call and no hand-off between
    threads. Over HTTP (client.kserve_http: keep-alive connections on the loop itself) or gRPC asyncio
    (tritonclient.grpc.aio); `url` is the endpoint of that protocol. The same retries and typed errors as
    TritonClient; the stable version (`embed`) or a pinned one. Connections are opened on first use, in the
    running loop."""

    def __init__(self, url: str | None = None, settings: Settings | None = None, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 30.0, protocol: Protocol | str = Protocol.GRPC, canary_share: float = 0.0,
                 view: Callable[[], ServingView] | None = None, view_ttl_s: float = 2.0):
        """`canary_share` of unpinned calls go to a canary version while one is loaded, as with TritonClient;
        `view` reads which versions are served (e.g. a TritonClient's `serving_view`, itself cached), called off
        the event loop at most every `view_ttl_s` seconds."""
        protocol = Protocol.parse(protocol)
        if not 0.0 <= canary_share <= 1.0:
            raise ValueError(f"canary_share must be within [0, 1], not {canary_share}")
        if canary_share > 0 and view is None:
            raise ValueError("a canary share needs `view`, a way to read which versions are served")
        self.settings = settings or settings_module.SETTINGS
        self.protocol = protocol
        self.url = url or (self.settings.server.grpc_url if protocol is Protocol.GRPC else self.settings.server.http_url)
        self.retry = retry
        self.timeout_s = timeout_s
        self.canary_share, self.view_ttl_s, self._view_source = canary_share, view_ttl_s, view
        self._view: tuple[float, ServingView] | None = None
        self._view_lock: asyncio.Lock | None = None
        self._client = None

    def _connection(self):
        if self._client is None:
            if self.protocol is Protocol.HTTP:
                from bert_recsys.client.kserve_http import AsyncKServeHttp

                self._client = AsyncKServeHttp(self.url)
            else:
                import tritonclient.grpc.aio as aio  # imported here: the synchronous client never needs it

                self._client = aio.InferenceServerClient(self.url, channel_args=grpc_channel_args())
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _infer(self, model: str, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        t = self.settings.tensors
        if self.protocol is Protocol.HTTP:
            return await self._connection().infer(model, t.text, texts, t.embedding, timeout_s)
        import tritonclient.grpc.aio as aio

        batch = TritonClient._texts(texts)
        tensor = aio.InferInput(t.text, list(batch.shape), "BYTES")
        tensor.set_data_from_numpy(batch)
        result = await self._connection().infer(model, [tensor], outputs=[aio.InferRequestedOutput(t.embedding)],
                                                client_timeout=timeout_s)
        return result.as_numpy(t.embedding)

    async def serving_view(self) -> ServingView:
        """Which versions are served, read at most every `view_ttl_s` seconds (one read at a time, off the loop)."""
        if self._view_lock is None:
            self._view_lock = asyncio.Lock()
        async with self._view_lock:
            now = time.monotonic()
            if self._view is None or now - self._view[0] > self.view_ttl_s:
                self._view = (now, await asyncio.to_thread(self._view_source))
            return self._view[1]

    async def route(self) -> int | None:
        """The canary version this call goes to, or None (stable): `canary_share` of calls while one is loaded."""
        draw = random.random()
        if draw >= self.canary_share:
            return None
        try:
            return canary_version(await self.serving_view(), self.canary_share, draw)
        except (ServingError, InvalidRequest):
            return None  # the versions could not be read: the stable one serves

    async def embed(self, texts: Sequence[str], encoder_version: int | None = None) -> np.ndarray:
        """Embeddings from the stable version, a canary (`canary_share` of unpinned calls; see `embed_parts`), or
        the pinned `encoder_version`."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        if encoder_version is not None:
            m = self.settings.models
            return await self._embed_on(m.pinned(m.embed, encoder_version), texts, self.retry)
        return (await self.embed_parts([texts]))[0]

    async def embed_parts(self, parts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """The parts of one request, all in flight at once, all from one version: the version is chosen once, so
        a response never mixes vectors of two versions. On the canary each part gets one attempt within half the
        timeout; if any fails, every part goes to the stable version (with the usual retries, within the other
        half), so the caller waits at most about its timeout and sees a success."""
        m = self.settings.models
        canary = await self.route() if self.canary_share > 0 else None
        if canary is not None:
            try:
                return list(await asyncio.gather(*(self._embed_on(m.pinned(m.embed, canary), part, CANARY_ATTEMPT,
                                                                  self.timeout_s / 2) for part in parts)))
            except CANARY_FALLBACK as error:
                if isinstance(error, ModelNotFound):
                    self._view = None  # promoted or rolled back since our view of it
            return list(await asyncio.gather(*(self._embed_on(m.embed, part, self.retry, self.timeout_s / 2)
                                               for part in parts)))
        return list(await asyncio.gather(*(self._embed_on(m.embed, part, self.retry) for part in parts)))

    async def _embed_on(self, model: str, texts: Sequence[str], retry: RetryPolicy,
                        timeout_s: float | None = None) -> np.ndarray:
        timeout_s = timeout_s or self.timeout_s
        delays = retry.delays()
        while True:
            try:
                return await self._infer(model, texts, timeout_s)
            except Exception as error:
                delay = next(delays, None)
                typed = failure(f"infer {model}", error, timeout_s, retry.attempts, delay is not None)
                if typed is error:
                    raise
                # Over HTTP this drops the idle keep-alive connections (the one that failed is never reused). A
                # gRPC channel is shared by every call in flight: closing it would cancel them all, and it
                # reconnects by itself (a late answer to a timed-out call goes nowhere).
                if self.protocol is Protocol.HTTP and (isinstance(typed, ServingTimeout) or typed is None):
                    await self.close()
                if typed is not None:
                    raise typed from None
                await asyncio.sleep(delay)
