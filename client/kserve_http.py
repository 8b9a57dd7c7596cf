"""KServe v2 inference over HTTP/1.1 on the running asyncio loop, with Triton's binary tensor extension.

Why not tritonclient.http.aio or tritonclient.grpc.aio: both add work per call (aiohttp's machinery; gRPC's
completion-queue thread and HTTP/2 framing) that a b1 request through the gateway pays on top of Triton's own
time. This speaks the one request the gateway sends most, `infer` with BYTES in and one tensor out, on
keep-alive connections that live on the event loop itself: no thread, no hand-off. `make bench-gateway`
measures it against the gRPC path in one run.

Failures are raised as tritonclient's own `InferenceServerException` carrying the HTTP status (Triton's
error JSON as the message), so client.errors.classify types them exactly as it types tritonclient's:
404 -> ModelNotFound, 400 -> InvalidRequest, 503 -> retried, then Unavailable. A connection that breaks
raises ConnectionError (retried); one that times out, TimeoutError (not retried).
"""
from __future__ import annotations

import asyncio
import json
from typing import Sequence

import numpy as np

DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
MAX_IDLE = 64  # idle keep-alive connections kept for reuse; more concurrent calls open (then close) their own


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """A BYTES tensor's binary form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def infer_request(input_name: str, texts: Sequence[str], output_name: str) -> tuple[bytes, int]:
    """The body of one infer call ([len(texts), 1] BYTES in, `output_name` back in binary) and the length of its
    JSON header (the `Inference-Header-Content-Length`)."""
    data = serialize_bytes([text.encode("utf-8") for text in texts])
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": [len(texts), 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }, separators=(",", ":")).encode()
    return header + data, len(header)


def parse_output(body: bytes, header_length: int | None, output_name: str) -> np.ndarray:
    """`output_name` from an infer response: binary after a JSON header of `header_length` bytes, or JSON data."""
    header = json.loads(body[:header_length] if header_length is not None else body)
    offset = header_length or 0
    for output in header.get("outputs", ()):
        size = output.get("parameters", {}).get("binary_data_size")
        if output["name"] != output_name:
            offset += size or 0
            continue
        dtype = DTYPES.get(output["datatype"])
        if dtype is None:
            raise ValueError(f"output {output_name} has datatype {output['datatype']}, which this client does not read")
        if size is None:
            return np.asarray(output["data"], dtype=dtype).reshape(output["shape"])
        return np.frombuffer(body, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=offset).reshape(output["shape"])
    raise ValueError(f"the response has no output {output_name!r}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 response: status, lower-cased headers, body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        return status, headers, await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
            chunks.append(chunk[:-2])
        return status, headers, b"".join(chunks)
    raise ConnectionError("the response has neither Content-Length nor chunked encoding")


class AsyncKServeHttp:
    """Keep-alive HTTP/1.1 connections to one Triton, used one call at a time each, on the running loop."""

    def __init__(self, url: str):
        address = url.split("://", 1)[-1].rstrip("/")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port for Triton's HTTP endpoint, not {url!r}")
        self.host, self.port = host, int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def infer(self, model: str, input_name: str, texts: Sequence[str], output_name: str,
                    timeout_s: float) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        body, header_length = infer_request(input_name, texts, output_name)
        request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {self.host}\r\n"
                   "Content-Type: application/octet-stream\r\n"
                   f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n\r\n"
                   ).encode() + body
        try:  # wait_for, not asyncio.timeout: the client package supports Python 3.10
            status, headers, payload = await asyncio.wait_for(self._exchange(request), timeout_s)
        except asyncio.TimeoutError:  # before 3.11 not the builtin TimeoutError that client.errors classifies
            raise TimeoutError(f"no answer from Triton within {timeout_s:g} s") from None
        if status != 200:
            try:
                text = json.loads(payload).get("error", "")
            except ValueError:
                text = payload[:200].decode("utf-8", "replace")
            raise InferenceServerException(msg=text or f"HTTP {status}", status=str(status))
        length = headers.get(b"inference-header-content-length")
        return parse_output(payload, int(length) if length is not None else None, output_name)

    async def _exchange(self, request: bytes):
        """Send one request and read its answer. A reused connection the server has since closed is replaced
        once, at once (the request never reached Triton); any other break is the caller's to retry."""
        reused = bool(self._idle)
        reader, writer = self._idle.pop() if reused else await self._open()
        done = False
        try:
            try:
                writer.write(request)
                status, headers, payload = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                if not reused or (isinstance(error, asyncio.IncompleteReadError) and error.partial):
                    raise ConnectionError(f"Triton closed the connection: {error}") from None
                writer.close()
                reader, writer = await self._open()
                writer.write(request)
                try:
                    status, headers, payload = await read_response(reader)
                except asyncio.IncompleteReadError as again:
                    raise ConnectionError(f"Triton closed the connection: {again}") from None
            done = headers.get(b"connection", b"").lower() != b"close"
            return status, headers, payload
        finally:  # a connection in an unknown state (cancelled, timed out, broken) is never reused
            if done and len(self._idle) < MAX_IDLE:
                self._idle.append((reader, writer))
            else:
                writer.close()

    async def _open(self):
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
