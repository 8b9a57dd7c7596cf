"""The gateway in front of a real tritonserver, called by the official `openai` package and by plain HTTP."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.client.triton import TritonClient
from bert_recsys.gateway.app import create_app
from bert_recsys.gateway.background import BackgroundGateway as Gateway
from bert_recsys.gateway.config import GatewaySettings
from bert_recsys.gateway.keys import KeyStore
from bert_recsys.gateway.recommender import load_recommender
from bert_recsys.client.tokens import TokenCounter
from bert_recsys.server.launcher import free_port

KEY = "test-gateway-key"


@pytest.fixture(scope="module")
def served(triton, movielens_slice, tmp_path_factory):
    # FP32: one text alone and the same text in a batch get the same vector to 1e-6, so the gateway's batches can
    # be compared with direct calls at cosine 0.9999 (INT8 is batch-invariant too, but further from FP32).
    server = triton("onnx-fp32")
    s = server.server
    client = TritonClient(s.grpc_url, settings=replace(settings.SETTINGS, server=s))
    tokenizer = server.repository / "tokenizer" / "1" / "tokenizer.json"
    config = GatewaySettings(port=free_port(), triton_url=s.grpc_url, triton_http_url=s.http_url, rate_rps=1000, rate_texts_per_s=100_000,
                             max_body_bytes=64_000, tokenizer_file=tokenizer, data_dir=movielens_slice,
                             index_store=tmp_path_factory.mktemp("gateway-index"))
    tokens = TokenCounter(tokenizer)
    recommender = load_recommender(config, client)
    app = create_app(config, client, KeyStore.from_plaintext([KEY]), tokens, recommender)
    with Gateway(app, config.port) as gateway:
        gateway.tokens, gateway.config, gateway.recommender = tokens, config, recommender
        yield gateway, client
    client.close()


def post(url, body, key=KEY, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


def test_the_openai_sdk_gets_the_same_vectors_as_embed(served):
    import openai

    gateway, client = served
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    texts = ["A man is playing a guitar.", "Sparkling water, not still.", "Der Hund schläft."]
    direct = client.embed(texts)
    one = sdk.embeddings.create(model="embed", input=texts[0], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].index == 0
    assert float(np.dot(one.data[0].embedding, direct[0])) >= 0.9999
    many = sdk.embeddings.create(model="embed", input=texts)  # the SDK asks for base64 by default
    got = np.array([d.embedding for d in many.data], dtype=np.float32)
    assert got.shape == direct.shape and np.min(np.sum(got * direct, axis=1)) >= 0.9999
    assert many.usage.prompt_tokens == gateway.tokens.count(texts) > len(texts)
    # base64 decodes to exactly the floats sent as JSON
    status, _, body = post(f"{gateway.url}/v1/embeddings", {"model": "embed", "input": texts, "encoding_format": "base64"})
    _, _, floats = post(f"{gateway.url}/v1/embeddings", {"model": "embed", "input": texts})
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    assert status == 200 and all(np.array_equal(a, np.array(b["embedding"], dtype=np.float32))
                                 for a, b in zip(decoded, floats["data"]))
    listed = sdk.models.list().data
    assert [m.id for m in listed] == ["embed"] and listed[0].model_extra["dimensions"] == direct.shape[1]


def test_batches_above_the_servers_max_batch_are_split(served):
    gateway, client = served
    texts = [f"sentence number {i} about trains" for i in range(settings.SETTINGS.batching.max_batch_size * 2 + 5)]
    status, _, body = post(f"{gateway.url}/v1/embeddings", {"model": "embed", "input": texts})
    assert status == 200 and [d["index"] for d in body["data"]] == list(range(len(texts)))
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert np.min(np.sum(got[-3:] * client.embed(texts[-3:]), axis=1)) >= 0.9999


@pytest.mark.parametrize("case, expected", [
    ("no key", 401), ("wrong key", 401), ("bad json", 422), ("missing field", 422), ("token ids", 400),
    ("other model", 404), ("dimensions", 400), ("too large", 413),
])
def test_bad_requests_get_a_clear_status_and_the_next_good_one_succeeds(served, case, expected):
    gateway, _ = served
    url = f"{gateway.url}/v1/embeddings"
    good = {"model": "embed", "input": "hello"}
    status, headers, body = {
        "no key": lambda: post(url, good, key=None),
        "wrong key": lambda: post(url, good, key="not-a-key"),
        "bad json": lambda: post(url, None, raw=b'{"model": "embed", "input": '),
        "missing field": lambda: post(url, {"model": "embed"}),
        "token ids": lambda: post(url, {"model": "embed", "input": [101, 2023, 102]}),
        "other model": lambda: post(url, {"model": "gpt-4", "input": "x"}),
        "dimensions": lambda: post(url, {"model": "embed", "input": "x", "dimensions": 128}),
        "too large": lambda: post(url, {"model": "embed", "input": ["y" * 1000] * 100}),
    }[case]()
    assert status == expected, body
    assert body["error"]["message"]
    if case == "missing field":
        assert body["error"]["param"] == "input"
    if expected == 401:
        assert headers["www-authenticate"] == "Bearer"
    assert post(url, good)[0] == 200


def test_over_the_rate_limit_is_429_with_retry_after(served, triton):
    gateway, client = served
    # This gateway reaches Triton over gRPC asyncio (the others over HTTP, the default).
    config = GatewaySettings(port=free_port(), rate_rps=2, rate_texts_per_s=1000, burst_s=1.0, embed_protocol="grpc")
    app = create_app(config, client, KeyStore.from_plaintext([KEY, "other"]))
    with Gateway(app, config.port) as limited:
        url = f"{limited.url}/v1/embeddings"
        statuses = [post(url, {"model": "embed", "input": "x"})[0] for _ in range(2)]
        status, headers, body = post(url, {"model": "embed", "input": "x"})
        assert statuses == [200, 200] and status == 429 and int(headers["retry-after"]) >= 1
        assert body["error"]["type"] == "rate_limit_error"
        assert post(url, {"model": "embed", "input": "x"}, key="other")[0] == 200  # per key
        time.sleep(0.6)
        assert post(url, {"model": "embed", "input": "x"})[0] == 200  # refilled


def test_the_async_client_over_http_and_grpc_agrees_with_embed_and_types_errors(served):
    """client/kserve_http.py against the real Triton: the same vectors as the synchronous gRPC client, many calls
    in flight at once (one connection each), and Triton's statuses typed as tritonclient's are."""
    import asyncio

    from bert_recsys.client.errors import ModelNotFound
    from bert_recsys.client.triton import AsyncTritonClient

    _, client = served
    s, texts = client.settings.server, ["A man is playing a guitar.", "Der Hund schläft.", "x" * 3000]
    direct = client.embed(texts)

    async def scenario():
        http = AsyncTritonClient(s.http_url, settings=client.settings, protocol="http")
        grpc = AsyncTritonClient(s.grpc_url, settings=client.settings, protocol="grpc")
        together = await http.embed(texts)
        alone = await asyncio.gather(*(http.embed([t]) for t in texts * 4))
        over_grpc = await grpc.embed(texts)
        with pytest.raises(ModelNotFound):
            await http.embed(["x"], encoder_version=99)
        after = await http.embed(texts[:1])  # the connection that carried the error is still good
        await http.close(), await grpc.close()
        return together, alone, over_grpc, after

    together, alone, over_grpc, after = asyncio.run(scenario())
    for got in (together, np.concatenate(alone[:3]), over_grpc):
        assert got.shape == direct.shape and np.min(np.sum(got * direct, axis=1)) >= 0.9999
    assert float(np.dot(after[0], direct[0])) >= 0.9999


def test_tritons_queue_policy_becomes_503_with_retry_after(export_dir, tmp_path):
    """A Triton whose entry queue holds one request (max_queue_size=1) rejects a burst with UNAVAILABLE; the gateway
    (retries off, so the rejection shows) answers those with 503 and Retry-After, the rest with 200, and serves
    the next request once the burst is over."""
    from bert_recsys.client.triton import RetryPolicy
    from bert_recsys.model_repository.render import build_repository
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    bounded = replace(settings.SETTINGS, batching=replace(settings.SETTINGS.batching, max_queue_size=1))
    path = build_repository(bounded, export_dir, "onnx-int8", "embedded", tmp_path / "bounded")
    server_settings = on_free_ports(bounded.server, admin_key="")
    with TritonServer(path, server_settings, log_file=tmp_path / "bounded.log"):
        client = TritonClient(server_settings.grpc_url, settings=replace(bounded, server=server_settings),
                              retry=RetryPolicy(attempts=1))
        config = GatewaySettings(port=free_port(), rate_rps=10_000, rate_texts_per_s=1_000_000)
        with Gateway(create_app(config, client, KeyStore.from_plaintext([KEY])), config.port) as gateway:
            url, texts = f"{gateway.url}/v1/embeddings", [f"a burst of texts, number {i}" for i in range(16)]
            answers: list[tuple[int, dict, dict]] = []
            for _ in range(10):  # bursts of 24 concurrent requests until Triton rejects some
                threads = [threading.Thread(target=lambda: answers.append(post(url, {"model": "embed", "input": texts})))
                           for _ in range(24)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                if any(status == 503 for status, _, _ in answers):
                    break
            time.sleep(1.0)
            after = post(url, {"model": "embed", "input": "the burst is over"})
        client.close()
    statuses = [status for status, _, _ in answers]
    rejected = [(headers, body) for status, headers, body in answers if status == 503]
    print(f"queue policy: {len(rejected)} of {len(statuses)} requests rejected with 503")
    assert set(statuses) <= {200, 503} and rejected and statuses.count(200) > 0, statuses
    assert all(h["retry-after"] == "1" and b["error"]["code"] == "unavailable" for h, b in rejected)
    assert after[0] == 200


def get(url, key=KEY):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_recommendations_equal_the_recommenders_own(served):
    from bert_recsys.client.catalog import load_catalog
    from bert_recsys.client.index import IndexStore
    from bert_recsys.client.recommend import Recommender

    gateway, client = served
    catalog = load_catalog(gateway.config.data_dir)
    items, interactions = catalog.items, catalog.interactions
    direct = Recommender(items, IndexStore(gateway.config.index_store).load(), interactions, client)
    users = sorted(direct.histories)[:5]
    for user in users:
        status, _, body = post(f"{gateway.url}/v1/recommendations", {"user_id": user, "n": 10, "blocked": [1, 2]})
        _, expected = direct.recommend(user, n=10, blocked={1, 2})
        assert status == 200 and body["items"] == json.loads(json.dumps(expected)), user
        assert body["encoder_version"] == 1 and all(item["why"] for item in body["items"])
    # An unknown user with a recent history gets a profile from it; without one, the cold-start list.
    liked = [item.item_id for item in items if "Animation" in item.categories][:8]
    status, _, body = post(f"{gateway.url}/v1/recommendations", {"user_id": 10**9, "n": 5, "history": liked})
    assert status == 200 and not body["cold"] and not set(liked) & {i["item_id"] for i in body["items"]}
    status, _, body = post(f"{gateway.url}/v1/recommendations", {"user_id": 10**9, "n": 5})
    assert status == 200 and body["cold"] and len(body["items"]) == 5
    status, similar = get(f"{gateway.url}/v1/users/{users[0]}/similar?k=3")
    assert status == 200 and [u["user_id"] for u in similar["similar"]] == [u for u, _ in direct.similar_users(users[0], 3)]
    assert get(f"{gateway.url}/v1/users/{10**9}/similar")[0] == 404
    status, _, pushed = post(f"{gateway.url}/v1/push", {"text": "Toy Story 5 (2026). Genres: Animation, Children",
                                                     "threshold": 0.3, "max_users": 5})
    expected_push = direct.push_targets("Toy Story 5 (2026). Genres: Animation, Children", 0.3, 5)
    assert status == 200 and [u["user_id"] for u in pushed["users"]] == [u for u, _ in expected_push]


def test_a_new_item_posted_to_the_gateway_is_embedded_into_the_live_index(served):
    gateway, client = served
    rec = gateway.recommender
    before = len(rec.index)
    body = {"item_id": 10**7, "title": "Toy Story 5 (2026)", "categories": ["Animation", "Children"],
            "text": "Woody and Buzz face a new rival: screens.", "keywords": ["toy", "Sequel"]}
    status, _, answer = post(f"{gateway.url}/v1/items", body)
    assert status == 201 and answer["indexed"] and answer["catalog_items"] == before + 1, answer
    assert rec.index.has(10**7) and rec.is_new(10**7) and rec.items[10**7].keywords == ("toy", "sequel")
    expected = client.embed([rec.template.render(rec.items[10**7])])
    np.testing.assert_allclose(rec.index.raw_vectors[-1], expected[0], atol=1e-5)  # embedded by Triton's `embed`
    assert post(f"{gateway.url}/v1/items", body)[0] == 409  # an id the catalog holds
    assert post(f"{gateway.url}/v1/items", {**body, "item_id": 10**7 + 1, "title": ""})[0] == 422  # as every field error
    assert post(f"{gateway.url}/v1/items", body, key=None)[0] == 401
    assert len(rec.index) == before + 1


def test_experiment_arms_and_events_through_the_gateway(served, tmp_path):
    """Recommendations carry the user's arm and a request id; impressions, clicks and conversions posted back are
    stored once, a malformed batch is refused whole, and the report counts what was posted."""
    from bert_recsys.client.experiments import Arm, EventStore, Experiment, ExperimentRecommender
    from bert_recsys.client.experiments import report as reporting

    gateway, client = served
    experiment = Experiment("gw-ab", (Arm("control"), Arm("semantic", channels=("semantic",), diversify=False)))
    events = EventStore(tmp_path / "events.sqlite")
    events.register(experiment)
    config = replace(gateway.config, port=free_port())
    recommender = load_recommender(config, client)
    app = create_app(config, client, KeyStore.from_plaintext([KEY]), None, recommender, events=events,
                     experiment=experiment)
    direct = ExperimentRecommender(recommender, experiment)
    shown = []
    with Gateway(app, config.port) as experimental:
        url = experimental.url
        for user in sorted(recommender.histories)[:8]:
            status, _, body = post(f"{url}/v1/recommendations", {"user_id": user, "n": 5})
            arm = experiment.assign(user)
            assert status == 200 and body["experiment"] == "gw-ab" and body["arm"] == arm.name, body
            _, expected, _ = direct.recommend_arm(arm, user, n=5)
            assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in expected]
            shown.append(body)
        assert len({b["arm"] for b in shown}) == 2 and len({b["request_id"] for b in shown}) == len(shown)
        batch = [{"event_id": f"imp-{b['request_id']}", "type": "impression", "request_id": b["request_id"],
                  "user_id": b["user_id"], "experiment": b["experiment"], "arm": b["arm"],
                  "encoder_version": b["encoder_version"], "items": [i["item_id"] for i in b["items"]]} for b in shown]
        first = shown[0]
        batch += [{"event_id": "click-1", "type": "click", "request_id": first["request_id"],
                   "user_id": first["user_id"], "item_id": first["items"][1]["item_id"], "position": 1},
                  {"event_id": "conv-1", "type": "conversion", "request_id": first["request_id"],
                   "user_id": first["user_id"], "item_id": first["items"][1]["item_id"], "value": 9.5}]
        status, _, stored = post(f"{url}/v1/events", {"events": batch})
        assert status == 200 and stored == {"accepted": 10, "duplicates": 0}
        counts = events.counts()
        assert counts == {"impression": 8, "click": 1, "conversion": 1}
        status, _, again = post(f"{url}/v1/events", {"events": batch})
        assert status == 200 and again == {"accepted": 0, "duplicates": 10}  # retried: stored once
        bad = [{**batch[0], "event_id": "new"}, {"event_id": "x", "type": "click", "request_id": "r", "user_id": 1}]
        status, _, refused = post(f"{url}/v1/events", {"events": bad})
        assert status == 422 and refused["error"]["reasons"] == ["event 1 (x): `item_id` is required"]
        assert events.counts() == counts  # nothing of the refused batch was stored
        assert post(f"{url}/v1/events", {"events": batch[:1]}, key=None)[0] == 401
    report = reporting.build(events, "gw-ab")
    arm = first["arm"]
    assert report["arms"][arm]["clicks"] == 1 and report["arms"][arm]["conversions"] == 1
    assert sum(a["impressions"] for a in report["arms"].values()) == 8
    events.close()


def test_health_and_metrics(served):
    gateway, _ = served
    assert post(f"{gateway.url}/v1/embeddings", {"model": "embed", "input": "x"})[0] == 200
    with urllib.request.urlopen(f"{gateway.url}/health/ready", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'gateway_responses_total{key="key1",route="/v1/embeddings",status="200"}' in text
    assert 'gateway_request_seconds_bucket{le="0.001",route="/v1/embeddings"}' in text
    # A 401 is counted under no key name; the key itself never appears.
    assert post(f"{gateway.url}/v1/embeddings", {"model": "embed", "input": "x"}, key="not-a-key")[0] == 401
    for _ in range(3):  # probes and scrapes are not traffic
        urllib.request.urlopen(f"{gateway.url}/health/live", timeout=10).close()
        urllib.request.urlopen(f"{gateway.url}/health/ready", timeout=10).close()
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'gateway_responses_total{key="none",route="/v1/embeddings",status="401"}' in text
    assert KEY not in text and "not-a-key" not in text
    assert "/health/" not in text and 'route="/metrics"' not in text


def gateway_process(server, log, port: int | None = None, **env: str):
    """`bert-recsys gateway` in a process of its own, in front of `server` (a served repository); -> (process, URL)
    once it answers /health/live."""
    import sys

    s = server.server
    port = port or free_port()
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_API_KEYS": KEY, "GATEWAY_TRITON_URL": s.grpc_url,
           "GATEWAY_TRITON_HTTP_URL": s.http_url, "GATEWAY_EVENTS_DB": "off", "GATEWAY_RATE_RPS": "10000",
           "GATEWAY_RATE_TEXTS_PER_S": "10000000",
           "GATEWAY_TOKENIZER_FILE": str(server.repository / "tokenizer" / "1" / "tokenizer.json"), **env}
    process = subprocess.Popen([sys.executable, "-m", "bert_recsys.gateway"], cwd=settings.REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health/live", timeout=2).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise AssertionError(f"the gateway did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)


def test_sigterm_under_load_drains_in_flight_requests_and_cuts_no_response_off(triton, tmp_path):
    """`bert-recsys gateway` SIGTERMed while 8 clients post 64-text embedding requests: it stops accepting, every
    response it had started is finished whole, requests in flight complete, and it exits 0 within its drain time."""
    import http.client

    drain_s, log = 10.0, tmp_path / "gateway.log"
    gateway, url = gateway_process(triton("onnx-int8"), log, GATEWAY_DRAIN_S=str(drain_s))
    try:
        texts = [f"sentence {i}: " + "a fairly long text about films and music that takes a while " * 4 for i in range(64)]
        body = json.dumps({"model": "embed", "input": texts}).encode()
        outcomes, stop = [], threading.Event()   # (started, ended, kind)

        def client():
            while not stop.is_set():
                started = time.monotonic()
                request = urllib.request.Request(f"{url}/v1/embeddings", data=body, method="POST", headers={
                    "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        raw = response.read()
                    kind = "whole" if len(json.loads(raw)["data"]) == len(texts) else "truncated"
                except (http.client.IncompleteRead, json.JSONDecodeError, KeyError):
                    kind = "truncated"          # a response started and cut off
                except urllib.error.HTTPError as error:
                    kind = f"http {error.code}"
                except (urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected):
                    kind = "not accepted"       # refused, or reset before any response began
                    stop.wait(0.05)
                outcomes.append((started, time.monotonic(), kind))
                if kind == "not accepted" and sigterm_at:
                    return

        sigterm_at = None
        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        sigterm_at = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(timeout=drain_s + 20)
        exited_after = time.monotonic() - sigterm_at
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    kinds = {}
    for _, _, kind in outcomes:
        kinds[kind] = kinds.get(kind, 0) + 1
    # Requests under way at SIGTERM: those the gateway had accepted finish whole; one still in the listen backlog
    # may be reset unanswered ("not accepted"), never cut off mid-body.
    in_flight = [kind for started, ended, kind in outcomes if started < sigterm_at < ended]
    assert code == 0, log.read_text()[-2000:]
    assert kinds.get("truncated", 0) == 0 and set(kinds) <= {"whole", "not accepted"}, kinds
    assert "whole" in in_flight and set(in_flight) <= {"whole", "not accepted"}, in_flight
    assert not any(thread.is_alive() for thread in threads)
    assert exited_after <= drain_s + 5, exited_after
    assert "gateway stopped" in log.read_text()
    print(f"gateway SIGTERMed under 8 clients: {in_flight.count('whole')} of {len(in_flight)} requests under way "
          f"completed whole (the rest were not yet accepted), exit 0 "
          f"{exited_after:.2f} s after SIGTERM (drain {drain_s:.0f} s); outcomes {kinds}")


def test_events_acknowledged_through_a_gateway_crash_are_stored_exactly_once(triton, tmp_path):
    """10,000 events from 8 clients, in batches of 25, retried on any error with the same event ids, while the
    gateway is SIGKILLed once and started again on the same port: every event that got a 2xx is in the store
    exactly once, every event got one in the end, and SQLite's integrity check passes."""
    import http.client
    import sqlite3

    server, db, log = triton("onnx-int8"), tmp_path / "events.db", tmp_path / "gateway.log"
    gateway, url = gateway_process(server, log, GATEWAY_EVENTS_DB=str(db))
    port = int(url.rsplit(":", 1)[1])
    acked, errors, lock = [], {}, threading.Lock()
    now = time.time()

    def client(c: int):
        for b in range(50):
            batch = [{"event_id": f"c{c}-b{b}-e{e}", "type": "click", "ts": now, "request_id": f"r{c}-{b}",
                      "user_id": f"u{c}", "item_id": e} for e in range(25)]
            body = json.dumps({"events": batch}).encode()
            deadline = time.monotonic() + 120
            while True:  # an application's retry loop: the same batch, the same event ids, until a 2xx
                request = urllib.request.Request(f"{url}/v1/events", data=body, method="POST", headers={
                    "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        json.loads(response.read())
                    with lock:
                        acked.extend(event["event_id"] for event in batch)
                    break
                except (urllib.error.URLError, ConnectionError, http.client.HTTPException, json.JSONDecodeError) as error:
                    with lock:
                        kind = type(error).__name__
                        errors[kind] = errors.get(kind, 0) + 1
                    assert time.monotonic() < deadline, errors
                    time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(8)]
    try:
        for thread in threads:
            thread.start()
        while len(acked) < 3000:
            time.sleep(0.01)
        gateway.kill()  # SIGKILL: no drain, no handler
        gateway.wait()
        killed_at = len(acked)
        gateway, _ = gateway_process(server, log, port=port, GATEWAY_EVENTS_DB=str(db))
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = [row[0] for row in conn.execute("SELECT event_id FROM events")]
    assert len(acked) == len(set(acked)) == 10_000
    assert len(stored) == len(set(stored)) == 10_000 and set(stored) == set(acked)
    assert errors, "the crash was never seen by a client"
    print(f"10,000 events from 8 clients, gateway SIGKILLed after {killed_at} were acknowledged and restarted: "
          f"every acknowledged event stored once, integrity ok; client errors retried: {errors}")


def failing_encoder_source(tmp_path):
    """A copy of the model sources whose encoder fails every real call while the repository it is loaded from holds
    a FAIL_VERSION file naming its version (read at each call): so the new version passes validation (on its own
    staging repository) and its load-time warmup, and fails as the live server's canary from when the file is
    written."""
    from bert_recsys.model_repository import render

    models = shutil.copytree(render.MODELS_SOURCE, tmp_path / "models")
    encoder_py = models / "encoder_embedded" / "model.py"
    source = encoder_py.read_text()
    source = source.replace("    def initialize(self, args):\n", "    def initialize(self, args):\n"
                            "        self.fail_marker = Path(args['model_repository']).parent / 'FAIL_VERSION'\n"
                            "        self.own_version = str(args['model_version'])\n", 1)
    # Real calls only: the load-time warmup (zero ids) passes, so the version loads and then fails as the canary.
    source = source.replace("    def execute(self, requests):\n", "    def execute(self, requests):\n"
                            "        ids = pb_utils.get_input_tensor_by_name(requests[0], self.input_names[0]).as_numpy()\n"
                            "        if ids.any() and self.fail_marker.exists() and "
                            "self.fail_marker.read_text().strip() == self.own_version:\n"
                            "            raise RuntimeError('this canary fails every call')\n", 1)
    assert source.count("fail_marker") == 3
    encoder_py.write_text(source)
    return models


def small_catalog(movielens_slice, target, movies: int):
    """The slice's first `movies` movies and their ratings: the rollout embeds the catalog through the canary."""
    target.mkdir()
    lines = (movielens_slice / "movies.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (target / "movies.csv").write_text("".join(lines[: movies + 1]), encoding="utf-8")
    kept = {line.split(",", 1)[0] for line in lines[1: movies + 1]}
    ratings = (movielens_slice / "ratings.csv").read_text().splitlines(keepends=True)
    (target / "ratings.csv").write_text(ratings[0] + "".join(r for r in ratings[1:] if r.split(",")[1] in kept))
    return target


def gateway_counts(url: str) -> dict[tuple[str, str], float]:
    """gateway_recommendations_total by (encoder_version, fell_back), read from the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.labels["encoder_version"], s.labels["fell_back"]): s.value for family in text_string_to_metric_families(text)
            if family.name == "gateway_recommendations" for s in family.samples if s.name.endswith("_total")}


@pytest.mark.slow
@pytest.mark.parametrize("canary, upstream", [("good", "http"), ("failing", "grpc"), ("failing-index", "grpc")])
def test_a_rollout_driven_only_by_gateway_traffic(export_dir, movielens_slice, tmp_path, monkeypatch, canary, upstream):
    """Only the gateway calls Triton (4 Locust users on /v1/embeddings and /v1/recommendations, canary share 0.25)
    while a new encoder version is rolled out, its catalog index embedded by the canary before the window:
    - a good canary gets its share of both routes (within +-30%) and is promoted;
    - one that fails every call from its window on is rolled back;
    - one that fails from the start cannot embed the catalog, and is rolled back before any recommendation uses it;
    and no application request fails: a call the canary fails is served by the stable version."""
    from bert_recsys.client.index import IndexStore
    from bert_recsys.model_repository import render
    from bert_recsys.model_repository.render import build_repository
    from bert_recsys.rollout import steps
    from bert_recsys.rollout.steps import LiveRepository, RolloutSettings, TritonAdmin, run
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    share = 0.25
    path = build_repository(settings.SETTINGS, export_dir, "onnx-int8", "embedded", tmp_path / "live")
    if canary != "good":
        monkeypatch.setattr(render, "MODELS_SOURCE", failing_encoder_source(tmp_path))
    if canary == "failing-index":
        (path / "FAIL_VERSION").write_text("2")
    windows = []

    def watched(*args, **kwargs):  # the gateway's recommendation counts at the canary window's start and end
        if canary == "failing":
            (path / "FAIL_VERSION").write_text("2")
        windows.append(gateway_counts(gateway.url))
        try:
            return watch_canary(*args, **kwargs)
        finally:
            windows.append(gateway_counts(gateway.url))

    watch_canary = steps.watch_canary
    monkeypatch.setattr(steps, "watch_canary", watched)
    server_settings = on_free_ports(settings.SETTINGS.server, admin_key="gateway-canary-key")
    live_settings = replace(settings.SETTINGS, server=server_settings)
    with TritonServer(path, server_settings, log_file=tmp_path / "live.log"):
        client = TritonClient(server_settings.grpc_url, settings=live_settings)
        config = GatewaySettings(port=free_port(), triton_url=server_settings.grpc_url,
                                 triton_http_url=server_settings.http_url, embed_protocol=upstream, canary_share=share,
                                 rate_rps=10_000, rate_texts_per_s=1_000_000, events_db=None,
                                 data_dir=small_catalog(movielens_slice, tmp_path / "catalog", 300),
                                 index_store=tmp_path / "indexes")
        app = create_app(config, client, KeyStore.from_plaintext([KEY]), None, load_recommender(config, client))
        with Gateway(app, config.port) as gateway:
            # Locust's gateway users, as applications call it (single texts: many requests, for a tight share).
            locust = subprocess.Popen(
                [str(settings.LOADTEST_PYTHON), "-m", "loadtest.run", "--protocol", "gateway", "--gateway-url",
                 gateway.url, "--users", "4", "--spawn-rate", "4", "--duration", "1200", "--tasks",
                 "embed:1,batch:0,recommend:1", "--think-ms", "10", "--out", str(tmp_path / "locust")],
                cwd=settings.REPO_ROOT, env={**os.environ, "LOADTEST_GATEWAY_KEY": KEY},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                time.sleep(8)  # every user running
                assert locust.poll() is None, locust.stdout.read()
                admin = TritonAdmin.single(server_settings.grpc_url, f"127.0.0.1:{server_settings.metrics_port}",
                                           server_settings.admin_key)
                # 20 s: the gateway reads which version is the canary at most every 2 s, so the window starts late
                # by up to 2 s of canary traffic (10% here; with the default 60 s window, 3%).
                rollout = RolloutSettings(latency_max_ratio=4.0, canary_seconds=20, canary_min_requests=20,
                                          canary_max_latency_ratio=4.0, drain_seconds=1)
                with TritonClient(server_settings.grpc_url, settings=live_settings) as rollout_client:
                    report = run(LiveRepository(path, live_settings), admin, export_dir / "onnx-fp32", rollout,
                                 store=IndexStore(config.index_store), client=rollout_client)
                admin.close()
                time.sleep(1)
            finally:
                locust.send_signal(signal.SIGTERM)
                output, _ = locust.communicate(timeout=180)
        client.close()
    summary = json.loads((tmp_path / "locust" / "summary.json").read_text())
    calls, failed = summary["aggregated"]["requests"], summary["aggregated"]["failures"]
    by_route = {name: task["requests"] for name, task in summary["tasks"].items()}
    verdict = report["canary"]
    seen = verdict["canary"]["requests"] / max(1, verdict["canary"]["requests"] + verdict["stable"]["requests"]
                                               - verdict["canary"]["failures"])  # a failed canary call is retried on stable
    lists = {key: windows[1].get(key, 0) - windows[0].get(key, 0) for key in windows[1]} if windows else {}
    total = sum(lists.values())
    print(f"{canary} canary over {upstream}: Triton's share {seen:.3f} of {verdict['canary']['requests']} + "
          f"{verdict['stable']['requests']} requests (configured {share}), canary failures "
          f"{verdict['canary']['failures']}; recommendation lists in the window by (version, fell back): {lists}; "
          f"outcome {report['outcome']} {verdict['reasons']}; Locust's gateway calls {calls} {by_route}, failed {failed}")
    assert calls > 50 and failed == 0, (summary["failure_kinds"], output[-2000:])
    if canary == "good":
        assert report["phases"][1][0] == "index" and report["index"].startswith("v2-")
        assert 0.7 * share <= seen <= 1.3 * share
        assert total > 100 and 0.7 * share <= lists.get(("2", "false"), 0) / total <= 1.3 * share
        assert report["outcome"] == "promoted" and verdict["canary"]["failures"] == 0
    elif canary == "failing":
        # Every canary call failed, and each was served by stable: recommendations too. Triton 2.51 counts a failed
        # ensemble request twice in nv_inference_request_failure (10 failed `embed` calls: 20 on the ensemble,
        # reason OTHER, and 10 on `encoder`, reason BACKEND), so the verdict's canary count reads about 2x: the share
        # is not asserted.
        assert report["outcome"] == "rolled_back"
        assert verdict["canary"]["failures"] >= 0.9 * verdict["canary"]["requests"] > 0
        # Known users' lists call the canary's `score` and fell back; cold users' (most of Locust's random ids) call
        # no model, so the canary's index served them whole.
        assert lists.get(("1", "true"), 0) > 0
    else:
        assert report["outcome"] == "rolled_back" and report["index"] is None and not windows
        assert [phase for phase, _ in report["phases"]] == ["validate", "index", "roll_back", "done"]
        assert verdict["reasons"][0].startswith("the canary could not embed the catalog index")


@pytest.mark.slow
def test_a_rollout_under_gateway_load_loses_no_request(export_dir, movielens_slice, tmp_path):
    """Threads call the gateway (embeddings and recommendations) while a new encoder version is staged,
    canaried and promoted on its Triton; the gateway's recommender follows the index store the rollout switches."""
    from bert_recsys.client.index import IndexStore
    from bert_recsys.model_repository.render import build_repository
    from bert_recsys.rollout.steps import LiveRepository, RolloutSettings, TritonAdmin, run
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    path = build_repository(settings.SETTINGS, export_dir, "onnx-int8", "embedded", tmp_path / "live")
    server_settings = on_free_ports(settings.SETTINGS.server, admin_key="gateway-rollout-key")
    live_settings = replace(settings.SETTINGS, server=server_settings)
    with TritonServer(path, server_settings, log_file=tmp_path / "live.log"):
        client = TritonClient(server_settings.grpc_url, settings=live_settings)
        config = GatewaySettings(port=free_port(), rate_rps=10_000, rate_texts_per_s=1_000_000,
                                 data_dir=movielens_slice, index_store=tmp_path / "index")
        app = create_app(config, client, KeyStore.from_plaintext([KEY]), None, load_recommender(config, client))
        outcomes: list[int] = []
        stop = threading.Event()

        def call(i):
            while not stop.is_set():
                if i % 2:
                    outcomes.append(post(f"{gateway.url}/v1/embeddings", {"model": "embed", "input": f"text {i}"})[0])
                else:
                    outcomes.append(post(f"{gateway.url}/v1/recommendations", {"user_id": 1 + i, "n": 5})[0])

        with Gateway(app, config.port) as gateway:
            threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(4)]
            for thread in threads:
                thread.start()
            admin = TritonAdmin.single(server_settings.grpc_url, f"127.0.0.1:{server_settings.metrics_port}",
                                       server_settings.admin_key)
            rollout = RolloutSettings(latency_max_ratio=4.0, canary_seconds=5, canary_min_requests=0,
                                      canary_max_latency_ratio=4.0, drain_seconds=1)
            rollout_client = TritonClient(server_settings.grpc_url, settings=live_settings)
            report = run(LiveRepository(path, live_settings), admin, export_dir / "onnx-fp32", rollout,
                         store=IndexStore(config.index_store), client=rollout_client)
            time.sleep(3)  # calls after the promotion, on the new version and the switched index
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            _, _, body = post(f"{gateway.url}/v1/recommendations", {"user_id": 2, "n": 5})
        rollout_client.close()
        client.close()
    failed = [s for s in outcomes if s != 200]
    print(f"gateway calls during the rollout: {len(outcomes)}, failed {len(failed)}; outcome {report['outcome']}")
    assert report["outcome"] == "promoted"
    assert len(outcomes) > 100 and failed == []
    assert body["encoder_version"] == 2  # the recommender followed the switched index
