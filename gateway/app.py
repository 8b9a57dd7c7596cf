"""The gateway's HTTP API (FastAPI on uvicorn).

    POST /v1/embeddings     OpenAI-compatible: the `openai` SDK, LangChain and LlamaIndex call it directly
    GET  /v1/models         what is served: the `embed` model, its variant, encoder version and dimension
    POST /v1/recommendations            a user's top n, with explanations (client.recommend.Recommender)
    GET  /v1/users/{user_id}/similar    users with the nearest interests
    POST /v1/push                       users whose interests match a new item's text
    POST /v1/items                      a new item, embedded through Triton into the live index (no rebuild, no
                                        restart): recommended at once to users whose likes it resembles
    POST /v1/events         impressions, clicks, conversions -> the experiment event store (client/experiments)
    GET  /health/live       the process answers
    GET  /health/ready      Triton's `embed` is ready
    GET  /metrics           Prometheus: latency per route, responses per route, status and key name, in flight
                            (traffic only: /metrics and /health/* are left out of these)

`/v1/*` needs `Authorization: Bearer <key>` (401 otherwise) and is rate-limited per key (429 with Retry-After).
Triton's own refusals map to HTTP: UNAVAILABLE (its queue policy, or down) -> 503 with Retry-After, a timeout ->
504, an invalid request -> 400. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import math
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from bert_recsys import logs
from bert_recsys.contracts.protocol import Protocol
from bert_recsys.client.canary import CanaryIndexes
from bert_recsys.client.catalog import Item
from bert_recsys.client.errors import InvalidRequest, ServingError
from bert_recsys.client.experiments import EventError, EventStore, Experiment, ExperimentError, ExperimentRecommender
from bert_recsys.client.triton import AsyncTritonClient
from bert_recsys.gateway.config import GatewaySettings
from bert_recsys.gateway.embeddings import EmbeddingsEndpoint
from bert_recsys.gateway.errors import RETRY_AFTER_UNAVAILABLE_S, ApiError, http_error
from bert_recsys.gateway.keys import KeyStore
from bert_recsys.gateway.ratelimit import RateLimiter
from bert_recsys.client.tokens import TokenCounter

log = logs.get("gateway")


class RecommendationRequest(BaseModel):
    user_id: int
    n: int = Field(10, ge=1, le=100)
    blocked: list[int] = Field(default_factory=list, max_length=10_000)
    history: list[int] | None = Field(None, max_length=1000)  # item ids, oldest first, for unknown users
    diversify: bool = True


class EventsRequest(BaseModel):
    events: list = Field(min_length=1, max_length=10_000)  # each event is checked by the event store


class ItemRequest(BaseModel):
    item_id: int
    title: str = Field(min_length=1, max_length=1000)
    text: str = Field("", max_length=100_000)          # the description (an overview)
    categories: list[str] = Field(default_factory=list, max_length=100)
    tagline: str = Field("", max_length=1000)
    keywords: list[str] = Field(default_factory=list, max_length=100)


class PushRequest(BaseModel):
    text: str = Field(min_length=1)
    threshold: float = Field(0.5, ge=-1.0, le=1.0)
    max_users: int = Field(100, ge=1, le=10_000)
    per_user_cap: int = Field(3, ge=1)
    pushes_so_far: dict[int, int] = Field(default_factory=dict)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram("gateway_request_seconds", "Latency per route", ["route"], registry=self.registry,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
        # `key` is the API key's name (keys.py), never the key: "none" where no known key was presented (a 401, or a
        # route outside /v1). Names are few and chosen by the operator, so the label's cardinality stays bounded.
        self.responses = Counter("gateway_responses", "Responses per route, status and API key name",
                                 ["route", "status", "key"], registry=self.registry)
        self.in_flight = Gauge("gateway_in_flight", "Requests being served", registry=self.registry)
        self.recommendations = Counter("gateway_recommendations", "Recommendation lists per encoder version they came "
                                       "from (a canary's share shows here), and whether a failed canary handed the "
                                       "call to the stable version", ["encoder_version", "fell_back"],
                                       registry=self.registry)
        self.upstream_ready = Gauge("gateway_upstream_ready", "1 when Triton reports the served model ready to this "
                                    "gateway, else 0 (asked at each scrape)", ["model"], registry=self.registry)


# Probes and scrapes are not traffic: counting them would put Prometheus's own scrapes and the orchestrator's
# health checks into the request rates, latencies and in-flight gauge that dashboards and alerts read.
UNMETERED = frozenset({"/metrics", "/health/live", "/health/ready"})
NO_KEY = "none"
READY_TIMEOUT_S = 2.0   # the readiness question asked at each scrape (Prometheus's scrape timeout is 10 s)


class Guard:
    """Pure ASGI middleware, in front of everything: API keys on /v1/* (401 before the body is even read),
    the body size cap (413), and metrics for every request. /v1/embeddings, the hot path, goes straight to its
    plain ASGI endpoint (gateway/embeddings.py); every other route to the FastAPI app."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics, keys: KeyStore, embeddings: EmbeddingsEndpoint):
        self.app, self.max_body_bytes, self.metrics, self.keys = app, max_body_bytes, metrics, keys
        self.embeddings = embeddings

    def caller(self, headers: dict) -> str | None:
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, presented = header.partition(" ")
        return self.keys.name_of(presented.strip()) if scheme.lower() == "bearer" else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in UNMETERED:
            return await self.app(scope, receive, send)
        route = ("/v1/users/{user_id}/similar" if path.startswith("/v1/users/")
                 else path if path in KNOWN_ROUTES else "other")
        started, status, key = time.perf_counter(), [500], NO_KEY
        self.metrics.in_flight.inc()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = dict(scope.get("headers", ()))
        try:
            if path.startswith("/v1/"):
                name = self.caller(headers)
                if name is None:
                    await ApiError(401, "missing or unknown API key: send `Authorization: Bearer <key>`",
                                   type_="authentication_error", code="invalid_api_key",
                                   headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send_status)
                    return
                scope.setdefault("state", {})["api_key"] = key = name
            length = headers.get(b"content-length")
            if length is not None and int(length) > self.max_body_bytes:
                await ApiError(413, f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes}",
                               code="body_too_large").response()(scope, receive, send_status)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise ApiError(413, f"request body is over the limit of {self.max_body_bytes} bytes",
                                   code="body_too_large")
                return message

            try:
                await (self.embeddings if path == "/v1/embeddings" else self.app)(scope, limited_receive, send_status)
            except ApiError as error:  # a chunked body that grew past the limit
                await error.response()(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.responses.labels(route, str(status[0]), key).inc()


KNOWN_ROUTES = {"/v1/embeddings", "/v1/models", "/v1/recommendations", "/v1/push", "/v1/events", "/v1/items"}


def create_app(config: GatewaySettings, client, keys: KeyStore, tokens: TokenCounter | None = None,
               recommender=None, clock=time.monotonic, events: EventStore | None = None,
               experiment: Experiment | None = None, embedder=None) -> FastAPI:
    """`client` is a client.triton.TritonClient (gRPC); the gateway owns no model code. `recommender` (a
    client.recommend.Recommender) enables the recommendation routes; without it they answer 501. `events`
    enables /v1/events; `experiment` serves recommendations by the user's arm. `embedder` (default: a
    client.triton.AsyncTritonClient over config.embed_protocol, to config.triton_http_url or the client's gRPC
    endpoint) serves /v1/embeddings."""
    if len(keys) == 0:
        raise ValueError("no API keys: set GATEWAY_API_KEYS or GATEWAY_KEY_FILE")

    metrics = Metrics()
    served = None
    if recommender is not None:
        # Recommendations' canary share: from the canary's own catalog index, which the rollout embeds before its
        # canary window (client/canary.py), so a query vector and the item vectors always come from one version.
        canary = (CanaryIndexes(recommender, client.serving_view, config.canary_share)
                  if config.canary_share > 0 and recommender.index_store is not None else None)
        served = ExperimentRecommender(recommender, experiment, canary)
    limiter = RateLimiter(config.rate_rps, config.rate_texts_per_s, config.burst_s)
    app = FastAPI(title="BERT serving gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(where) or None
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('msg')}"
        else:
            message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
        return ApiError(422, message, param=field, code=first.get("type")).response()

    async def caller(request: Request) -> str:  # async: a sync dependency would cost a thread hop per request
        """The key's name, checked by Guard before the request got here."""
        return request.state.api_key

    def admit(key: str, texts: int) -> None:
        wait = limiter.admit(key, texts, clock())
        if wait == math.inf:
            raise ApiError(400, f"{texts} texts in one request is more than this key's rate limit allows at once; "
                                "split the request", param="input", code="too_many_inputs")
        if wait > 0:
            raise ApiError(429, f"rate limit of this key reached; retry in {wait:.2f} s", type_="rate_limit_error",
                           code="rate_limited", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def serving(call):
        """Triton's answer, or its failure as an HTTP status."""
        try:
            return call()
        except (ServingError, InvalidRequest) as error:
            raise http_error(error) from None

    # `embed` is awaited on the event loop (HTTP or gRPC asyncio, config.embed_protocol): no worker thread per
    # request (measured in bench/gateway.py). The other routes call the synchronous gRPC client from
    # FastAPI's thread pool.
    if embedder is None:
        if client.protocol is not Protocol.GRPC:
            raise ValueError("the gateway talks to Triton over gRPC: give it a gRPC TritonClient")
        url = (config.triton_http_url or client.settings.server.http_url) if config.embed_protocol is Protocol.HTTP else client.url
        # A canary gets `canary_share` of these calls; the versions served are read fresh through the synchronous
        # client, at most every 2 s (the async client caches them). Recommendations take the same share from the
        # canary's own catalog index (above), so vectors of two versions never meet.
        embedder = AsyncTritonClient(url, settings=client.settings, retry=client.retry, timeout_s=client.timeout_s,
                                     protocol=config.embed_protocol, canary_share=config.canary_share,
                                     view=lambda: client.serving_view(max_age_s=0))
    embeddings = EmbeddingsEndpoint(config.model, config.max_inputs, client.settings.batching.max_batch_size,
                                    embedder.embed_parts, admit, client.embedding_dim, tokens.count if tokens else None)

    @app.get("/v1/models")
    def models(_: str = Depends(caller)):
        info = serving(client.encoder_info)
        model = {"id": config.model, "object": "model", "created": 0, "owned_by": "bert-serving",
                 "variant": info.get("export_variant"), "encoder_version": int(info["export_version"]),
                 "dimensions": serving(client.embedding_dim)}
        return {"object": "list", "data": [model]}

    def recommendations_enabled():
        if recommender is None:
            raise ApiError(501, "recommendations are not enabled: start the gateway with GATEWAY_DATA "
                                "(a catalog directory)", type_="server_error", code="not_enabled")
        return recommender

    @app.post("/v1/recommendations")
    def recommendations(body: RecommendationRequest, key: str = Depends(caller)):
        recommendations_enabled()
        admit(key, 1)
        try:
            result = serving(lambda: served.recommend(body.user_id, n=body.n, blocked=set(body.blocked),
                                                      history=body.history, diversify=body.diversify))
        except ExperimentError as error:  # an arm pinned to an encoder version with no index
            raise ApiError(503, str(error), type_="server_error", code="arm_unavailable") from None
        metrics.recommendations.labels(str(result.encoder_version), str(result.fell_back).lower()).inc()
        return {"request_id": result.request_id, "experiment": result.experiment, "arm": result.arm,
                "user_id": body.user_id, "encoder_version": result.encoder_version, "cold": result.profile.is_cold,
                "profile": result.profile.summary(), "items": result.items}

    @app.post("/v1/events")
    def post_events(body: EventsRequest, key: str = Depends(caller)):
        if events is None:
            raise ApiError(501, "events are not enabled: GATEWAY_EVENTS_DB is off", type_="server_error",
                           code="not_enabled")
        admit(key, 1)
        try:
            return events.append(body.events).to_json()
        except EventError as error:
            return JSONResponse({"error": {"message": f"no event was stored: {error}", "type": "invalid_request_error",
                                           "param": "events", "code": "invalid_events", "reasons": error.reasons}},
                                status_code=422)

    @app.get("/v1/users/{user_id}/similar")
    def similar(user_id: int, k: int = 10, key: str = Depends(caller)):
        rec = recommendations_enabled()
        if user_id not in rec.histories:
            raise ApiError(404, f"user {user_id} is not known", param="user_id", code="user_not_found")
        if not 1 <= k <= 1000:
            raise ApiError(400, "k must be within 1..1000", param="k")
        admit(key, 1)
        return {"user_id": user_id, "similar": [{"user_id": u, "score": round(score, 6)}
                                                for u, score in rec.similar_users(user_id, k)]}

    @app.post("/v1/push")
    def push(body: PushRequest, key: str = Depends(caller)):
        rec = recommendations_enabled()
        admit(key, 1)
        users = serving(lambda: rec.push_targets(body.text, body.threshold, body.max_users, body.pushes_so_far,
                                                 body.per_user_cap))
        return {"users": [{"user_id": u, "score": round(score, 6)} for u, score in users]}

    @app.post("/v1/items", status_code=201)
    def add_item(body: ItemRequest, key: str = Depends(caller)):
        rec = recommendations_enabled()
        if body.item_id in rec.items:
            raise ApiError(409, f"item {body.item_id} is already in the catalog", param="item_id", code="item_exists")
        admit(key, 1)
        item = Item(body.item_id, body.title.strip(), tuple(c.strip() for c in body.categories if c.strip()),
                    description=" ".join(body.text.split()), tagline=" ".join(body.tagline.split()),
                    keywords=tuple(k.strip().lower() for k in body.keywords if k.strip()))
        started = time.perf_counter()
        serving(lambda: rec.add_item(item))
        return {"item_id": item.item_id, "indexed": True, "catalog_items": len(rec.index),
                "encoder_version": rec.index.encoder_version, "template": rec.index.template,
                "seconds": round(time.perf_counter() - started, 4)}

    @app.get("/health/live")
    def live():
        return {"status": "live"}

    @app.get("/health/ready")
    def ready():
        if client.model_ready(config.model, timeout_s=READY_TIMEOUT_S):
            return {"status": "ready"}
        return JSONResponse({"status": "not ready", "reason": f"Triton's {config.model!r} is not ready"},
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})

    @app.get("/metrics")
    def prometheus():
        # Triton can answer its own metrics while its model is not ready (strict readiness): the readiness that
        # the gateway's callers depend on is asked here, bounded so that a black-holed Triton cannot stall a scrape.
        ready = client.model_ready(config.model, timeout_s=READY_TIMEOUT_S)
        metrics.upstream_ready.labels(config.model).set(1 if ready else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, config.max_body_bytes, metrics, keys, embeddings)
