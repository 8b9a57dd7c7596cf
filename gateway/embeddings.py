"""POST /v1/embeddings, OpenAI-compatible, as a plain ASGI endpoint.

It is the gateway's hot path, so it skips FastAPI's routing, dependency injection and pydantic: measured here
with Triton stubbed out, those cost ~0.3 ms of a ~0.5 ms round trip (`make bench-gateway` has the figures).
The request is checked by `parse_request`, a pure function with the same answers the pydantic model gave:
422 naming the field for malformed JSON, a missing field or a wrong type; 400 for token ids.
Auth, the body cap and metrics happen before, in gateway.app.Guard.
"""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
import orjson

from bert_recsys import logs
from bert_recsys.client.errors import InvalidRequest, ServingError
from bert_recsys.gateway.errors import ApiError, http_error

log = logs.get("gateway")
ENCODINGS = ("float", "base64")
FEW_TEXTS = 8  # up to this many texts, tokens are counted on the loop: faster than a hop to a thread


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: tuple[str, ...]
    model: str
    encoding_format: str = "float"
    dimensions: int | None = None


def _invalid(field: str | None, message: str, code: str) -> ApiError:
    return ApiError(422, f"{field or 'body'}: {message}", param=field, code=code)


def parse_request(body: bytes) -> EmbeddingRequest:
    """The request, or ApiError: 422 (not JSON, not an object, a field missing or of the wrong type), 400 (token
    ids instead of text, an empty input). Fields it does not use (e.g. `user`) are accepted and ignored."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiError(422, f"the body is not valid JSON: {error}", code="json_invalid") from None
    if not isinstance(data, dict):
        raise _invalid(None, "expected a JSON object", "type_error")
    for field in ("input", "model"):
        if field not in data:
            raise _invalid(field, "field required", "missing")
    raw, model = data["input"], data["model"]
    if not isinstance(model, str):
        raise _invalid("model", "expected a string", "string_type")
    if isinstance(raw, str):
        texts = (raw,)
    elif isinstance(raw, list):
        if raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw) or raw and all(
                isinstance(t, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in t) for t in raw):
            raise ApiError(400, "token ids are not accepted: send `input` as a string or a list of strings",
                           param="input", code="token_input_unsupported")
        bad = next((i for i, t in enumerate(raw) if not isinstance(t, str)), None)
        if bad is not None:
            raise _invalid(f"input.{bad}", "expected a string (input is a string or a list of strings)", "string_type")
        texts = tuple(raw)
    else:
        raise _invalid("input", "expected a string or a list of strings", "type_error")
    if not texts:
        raise ApiError(400, "`input` is empty", param="input")
    encoding = data.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise _invalid("encoding_format", f"expected one of {', '.join(ENCODINGS)}", "literal_error")
    dimensions = data.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
        raise _invalid("dimensions", "expected an integer", "int_type")
    return EmbeddingRequest(texts, model, encoding, dimensions)


def response_body(request: EmbeddingRequest, vectors: np.ndarray, prompt_tokens: int) -> bytes:
    """OpenAI's embeddings response: float rows (orjson writes float32 natively) or base64 of little-endian FP32."""
    if request.encoding_format == "base64":
        data = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
    else:
        data = list(np.ascontiguousarray(vectors, dtype=np.float32))
    return orjson.dumps({"object": "list", "model": request.model,
                         "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


async def read_body(receive) -> bytes | None:
    """The whole request body (None if the caller went away first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


class EmbeddingsEndpoint:
    """The ASGI endpoint. `embed_parts(parts)` is client.triton.AsyncTritonClient.embed_parts (every part of one
    request from one encoder version, stable or canary); `admit(key, n_texts)` raises
    ApiError 429/400 from the key's token buckets; `dimension()` is the served D (a blocking call, read once);
    `count_tokens(texts)` is client.tokens.TokenCounter.count, or None (usage is then 0)."""

    def __init__(self, model: str, max_inputs: int, max_batch_size: int,
                 embed_parts: Callable[[list[list[str]]], Awaitable[list[np.ndarray]]], admit: Callable[[str, int], None],
                 dimension: Callable[[], int], count_tokens: Callable[[list[str]], int] | None = None):
        self.model, self.max_inputs, self.max_batch_size = model, max_inputs, max_batch_size
        self.embed_parts, self.admit, self.dimension, self.count_tokens = embed_parts, admit, dimension, count_tokens
        self._dimension: int | None = None

    async def __call__(self, scope, receive, send):
        try:
            if scope["method"] != "POST":
                raise ApiError(405, "use POST", code="method_not_allowed", headers={"Allow": "POST"})
            body = await read_body(receive)
            if body is None:
                return
            payload = await self.answer(parse_request(body), scope["state"]["api_key"])
        except ApiError as error:
            await error.response()(scope, receive, send)
            return
        except Exception:  # a bug: logged here, answered in OpenAI's shape, never the traceback
            log.exception("POST /v1/embeddings failed")
            await ApiError(500, "internal error in the gateway", type_="server_error").response()(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def answer(self, request: EmbeddingRequest, key: str) -> bytes:
        texts = list(request.texts)
        if len(texts) > self.max_inputs:
            raise ApiError(400, f"{len(texts)} inputs; at most {self.max_inputs} per request", param="input")
        if request.model != self.model:
            raise ApiError(404, f"model {request.model!r} is not served here; use {self.model!r}", param="model",
                           code="model_not_found")
        if request.dimensions is not None:
            dim = await self.served_dimension()
            if request.dimensions != dim:
                raise ApiError(400, f"dimensions={request.dimensions}: this model returns {dim} (no truncation)",
                               param="dimensions")
        self.admit(key, len(texts))
        size = self.max_batch_size
        try:  # split to the server's max_batch_size, all parts in flight at once
            parts = await self.embed_parts([texts[i:i + size] for i in range(0, max(len(texts), 1), size)])
            vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
        except (ServingError, InvalidRequest) as error:
            raise http_error(error) from None
        if self.count_tokens is None:
            counted = 0
        elif len(texts) <= FEW_TEXTS:
            counted = self.count_tokens(texts)
        else:
            counted = await asyncio.to_thread(self.count_tokens, texts)
        return response_body(request, vectors, counted)

    async def served_dimension(self) -> int:
        if self._dimension is None:
            try:
                self._dimension = await asyncio.to_thread(self.dimension)
            except (ServingError, InvalidRequest) as error:
                raise http_error(error) from None
        return self._dimension
