"""The gateway's pure parts: token buckets, hashed keys, settings."""
from __future__ import annotations

import math

import pytest

from bert_recsys.gateway.config import GatewaySettings
from bert_recsys.gateway.keys import KeyFileError, KeyStore, key_hash
from bert_recsys.gateway.ratelimit import RateLimiter


def test_the_bucket_admits_a_burst_then_the_rate():
    limiter = RateLimiter(requests_per_s=10, texts_per_s=1000, burst_s=1.0)
    admitted = [limiter.admit("a", 1, now=0.0) == 0.0 for _ in range(12)]
    assert admitted.count(True) == 10  # the burst: one second of the rate
    assert limiter.admit("a", 1, now=0.0) == pytest.approx(0.1)  # one token refills in 1/10 s
    assert limiter.admit("a", 1, now=0.1) == 0.0
    # Over 10 s of steady offers every 10 ms, it admits the rate, not the offers.
    admitted = sum(limiter.admit("a", 1, now=1.0 + i / 100) == 0.0 for i in range(1000))
    assert admitted == pytest.approx(100, abs=11)


def test_texts_are_charged_all_or_nothing_and_keys_are_separate():
    limiter = RateLimiter(requests_per_s=100, texts_per_s=50, burst_s=1.0)
    assert limiter.admit("a", 40, now=0.0) == 0.0
    assert limiter.admit("a", 20, now=0.0) == pytest.approx(0.2)  # 10 left, 10 more in 0.2 s
    assert limiter.admit("a", 10, now=0.0) == 0.0                  # the refused request took nothing
    assert limiter.admit("a", 51, now=5.0) == math.inf             # more than the bucket ever holds
    assert limiter.admit("b", 50, now=0.0) == 0.0


def test_keys_are_stored_and_matched_hashed(tmp_path):
    store = KeyStore.from_plaintext(["s3cret", "other"])
    assert store.name_of("s3cret") == "key1" and store.name_of("other") == "key2"
    assert store.name_of("nope") is None and store.name_of("") is None and store.name_of(None) is None
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\nsearch:{key_hash('abc')}\n\nrecs:{key_hash('def').upper()}\n")
    from_file = KeyStore.from_file(key_file)
    assert (from_file.name_of("abc"), from_file.name_of("def"), len(from_file)) == ("search", "recs", 2)
    assert "abc" not in key_file.read_text()
    key_file.write_text("search:abc\n")
    with pytest.raises(KeyFileError, match=r"keys:1: expected"):
        KeyStore.from_file(key_file)


def test_settings_come_from_the_environment_and_are_checked(monkeypatch):
    monkeypatch.setenv("GATEWAY_PORT", "9999")
    monkeypatch.setenv("GATEWAY_API_KEYS", "a, b,")
    config = GatewaySettings.from_env()
    assert (config.host, config.port, config.api_keys) == ("127.0.0.1", 9999, ("a", "b"))
    with pytest.raises(ValueError, match="port"):
        GatewaySettings(port=0)
    with pytest.raises(ValueError, match="positive"):
        GatewaySettings(rate_rps=0)


class FailingClient:
    """Stands in for client.triton.TritonClient: raises what the real one raises for each Triton failure."""

    def __init__(self, error=None, ready=True):
        from bert_recsys import settings

        self.settings, self.error, self.is_ready = settings.SETTINGS, error, ready

    def embedding_dim(self):
        return 384

    async def embed_parts(self, parts):  # as client.triton.AsyncTritonClient
        raise self.error

    def model_ready(self, model, timeout_s=None):
        return self.is_ready


@pytest.mark.parametrize("error, status, retry_after", [
    ("Unavailable", 503, "1"), ("ServingTimeout", 504, None), ("ServingError", 502, None),
    ("InvalidRequest", 400, None), ("ModelNotFound", 404, None),
])
def test_tritons_failures_become_http_statuses(error, status, retry_after):
    from fastapi.testclient import TestClient

    import bert_recsys.client.errors as errors
    from bert_recsys.gateway.app import create_app

    failing = FailingClient(getattr(errors, error)("what Triton said"))
    app = create_app(GatewaySettings(), failing, KeyStore.from_plaintext(["k"]), embedder=failing)
    with TestClient(app) as http:
        response = http.post("/v1/embeddings", json={"model": "embed", "input": "x"}, headers={"Authorization": "Bearer k"})
    assert response.status_code == status and "what Triton said" in response.json()["error"]["message"]
    assert response.headers.get("retry-after") == retry_after


def test_readiness_follows_tritons_embed_and_auth_comes_before_the_body():
    from fastapi.testclient import TestClient

    from bert_recsys.gateway.app import create_app

    app = create_app(GatewaySettings(), FailingClient(ready=False), KeyStore.from_plaintext(["k"]), embedder=FailingClient())
    with TestClient(app) as http:
        assert http.get("/health/ready").status_code == 503 and http.get("/health/live").status_code == 200
        # No key and a malformed body: 401, not 422 (the body of an unknown caller is never parsed).
        assert http.post("/v1/embeddings", content=b"{not json").status_code == 401
        assert http.get("/v1/users/1/similar", headers={"Authorization": "Bearer k"}).status_code == 501


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "embed", "input": ', 422, None),                   # not JSON
    (b'["embed"]', 422, None),                                      # not an object
    (b'{"model": "embed"}', 422, "input"),                          # missing
    (b'{"input": "x"}', 422, "model"),
    (b'{"model": 3, "input": "x"}', 422, "model"),                  # wrong types
    (b'{"model": "embed", "input": {"text": "x"}}', 422, "input"),
    (b'{"model": "embed", "input": ["a", 2]}', 422, "input.1"),
    (b'{"model": "embed", "input": "x", "encoding_format": "int8"}', 422, "encoding_format"),
    (b'{"model": "embed", "input": "x", "dimensions": "384"}', 422, "dimensions"),
    (b'{"model": "embed", "input": "x", "dimensions": true}', 422, "dimensions"),
    (b'{"model": "embed", "input": [101, 2023, 102]}', 400, "input"),  # token ids, flat or nested
    (b'{"model": "embed", "input": [[101, 102], [101]]}', 400, "input"),
    (b'{"model": "embed", "input": []}', 400, "input"),
])
def test_embedding_requests_are_checked_field_by_field(body, status, param):
    from bert_recsys.gateway.embeddings import parse_request
    from bert_recsys.gateway.errors import ApiError

    with pytest.raises(ApiError) as refused:
        parse_request(body)
    assert (refused.value.status, refused.value.param) == (status, param)
    assert refused.value.message and (param is None or param in refused.value.message or status == 400)


def test_embedding_requests_as_the_sdks_send_them():
    from bert_recsys.gateway.embeddings import EmbeddingRequest, parse_request

    assert parse_request(b'{"model": "embed", "input": "hi"}') == EmbeddingRequest(("hi",), "embed")
    # the openai SDK asks for base64 and may send fields the gateway does not use
    sdk = parse_request(b'{"model": "embed", "input": ["a", "b"], "encoding_format": "base64", "user": "u1", '
                        b'"dimensions": 384}')
    assert sdk == EmbeddingRequest(("a", "b"), "embed", "base64", 384)
    assert parse_request(b'{"model": "embed", "input": "x", "dimensions": null}').dimensions is None
