"""client/kserve_http.py against a scripted HTTP server on loopback (the real Triton is in
tests/integration/test_gateway.py): keep-alive reuse, a connection the server closed, chunked bodies, Triton's
error statuses typed as tritonclient's are, timeouts."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from bert_recsys.client.errors import InvalidRequest, ModelNotFound, ServingTimeout, Unavailable
from bert_recsys.client.kserve_http import AsyncKServeHttp, infer_request, parse_output, serialize_bytes
from bert_recsys.client.triton import AsyncTritonClient, RetryPolicy

VECTOR = np.arange(6, dtype=np.float32).reshape(2, 3)


def ok_response(chunked: bool = False, close: bool = False) -> bytes:
    header = json.dumps({"model_name": "embed", "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": [2, 3],
                                                              "parameters": {"binary_data_size": VECTOR.nbytes}}]}).encode()
    body = header + VECTOR.tobytes()
    head = f"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: {len(header)}\r\n"
    head += "Connection: close\r\n" if close else ""
    if chunked:
        middle = len(body) // 2
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:middle], body[middle:]))
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def error_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


class ScriptedServer:
    """Answers each request with the next scripted action: bytes to send, "close" (close without answering),
    "hang" (never answer), or "send+close" (answer, then close the idle connection)."""

    def __init__(self, script):
        self.script, self.connections, self.requests = list(script), 0, []

    async def handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length"))
                self.requests.append((head, await reader.readexactly(length)))
                action = self.script.pop(0)
                if action == "close":
                    break
                if action == "hang":
                    await asyncio.sleep(3600)
                if isinstance(action, tuple):  # ("send+close", bytes)
                    writer.write(action[1])
                    await writer.drain()
                    break
                writer.write(action)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_the_request_and_response_formats():
    assert serialize_bytes([b"ab", b""]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    body, header_length = infer_request("TEXT", ["héllo"], "EMBEDDING")
    header = json.loads(body[:header_length])
    assert header["inputs"][0] == {"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4 + len("héllo".encode())}}
    assert body[header_length:] == serialize_bytes(["héllo".encode()])
    as_json = json.dumps({"outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": [2, 3],
                                       "data": VECTOR.ravel().tolist()}]}).encode()
    assert np.array_equal(parse_output(as_json, None, "EMBEDDING"), VECTOR)
    with pytest.raises(ValueError, match="no output 'OTHER'"):
        parse_output(as_json, None, "OTHER")


def test_keep_alive_chunked_and_a_connection_the_server_closed():
    async def scenario():
        script = [ok_response(), ok_response(chunked=True), ("send+close", ok_response()), ok_response(),
                  ok_response(close=True), ok_response()]
        async with ScriptedServer(script) as server:
            client = AsyncKServeHttp(server.url)
            got = [await client.infer("embed", "TEXT", ["a", "b"], "EMBEDDING", 5) for _ in range(6)]
            await client.close()
            return got, server.connections, server.requests
    got, connections, requests = run(scenario())
    assert all(np.array_equal(g, VECTOR) for g in got)
    # one connection for the first three calls; the server closed it idle, so the fourth reopened (once, at once);
    # the fifth answer said `Connection: close`, so the sixth opened a third.
    assert connections == 3 and len(requests) == 6
    assert requests[0][0].startswith(b"POST /v2/models/embed/infer HTTP/1.1")


def test_tritons_statuses_are_typed_and_retried_like_tritonclients():
    async def scenario():
        script = [error_response(503, "queue full"), error_response(503, "queue full"), ok_response(),  # retried
                  error_response(404, "unknown model"), error_response(400, "bad input"),
                  *[error_response(503, "down")] * 3]
        async with ScriptedServer(script) as server:
            client = AsyncTritonClient(server.url, protocol="http", retry=RetryPolicy(attempts=3, initial_backoff_s=0.01))
            first = await client.embed(["a", "b"])
            errors = []
            for _ in range(3):
                try:
                    await client.embed(["a"])
                except Exception as error:
                    errors.append(error)
            await client.close()
            return first, errors
    first, errors = run(scenario())
    assert np.array_equal(first, VECTOR)
    assert [type(e) for e in errors] == [ModelNotFound, InvalidRequest, Unavailable]
    assert "unknown model" in str(errors[0]) and "down" in str(errors[2])


def test_a_timeout_is_not_retried_and_the_connection_is_dropped():
    async def scenario():
        async with ScriptedServer(["hang", ok_response()]) as server:
            client = AsyncTritonClient(server.url, protocol="http", timeout_s=0.3)
            with pytest.raises(ServingTimeout):
                await client.embed(["a"])
            again = await client.embed(["a"])  # a new connection: the hung one is never reused
            await client.close()
            return again, server.connections, len(server.requests)
    again, connections, requests = run(scenario())
    assert np.array_equal(again, VECTOR) and connections == 2 and requests == 2


def test_a_refused_connection_is_unavailable_after_the_retries():
    async def scenario():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = AsyncTritonClient(f"127.0.0.1:{port}", protocol="http", retry=RetryPolicy(attempts=2, initial_backoff_s=0.01))
        with pytest.raises(Unavailable, match="after 2 attempts"):
            await client.embed(["a"])
    run(scenario())
