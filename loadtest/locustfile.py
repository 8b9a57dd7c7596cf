"""Locust users against a Triton deployment of this project: `embed`, `score` and the whole recommend path.

    LOADTEST_PROTOCOL=http|grpc|gateway  which protocol the users speak (default http); `gateway`: the HTTP
                                 gateway (gateway/), tasks embed (1 text), batch (32 texts), recommend
    LOADTEST_GATEWAY_KEY=key     the gateway's API key (default: the first of GATEWAY_API_KEYS)
    LOADTEST_GRPC_URL=host:port  where the recommend path's gRPC client goes (default 127.0.0.1:8001)
    LOADTEST_TASKS=embed:6,score:3,recommend:1   task weights (0 disables a task)
    LOADTEST_STEP=users,seconds,max_users        step-load shape instead of a fixed user count
    LOADTEST_THINK_MS=0                          each user's pause between calls
    LOADTEST_CANARY_SHARE=0.2                    share of embed/score calls sent to a canary version while
                                                 a rollout runs one (rollout/), like client.triton does

Request texts are real: STS-B sentences and MovieLens titles when ../shared/data is there, else this
project's own gate sentences. Run it through `bert-recsys bench loadtest` (or `make loadtest`).
"""
from __future__ import annotations

# gRPC under gevent needs this before anything imports grpc (tritonclient.grpc does).
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
from locust import FastHttpUser, LoadTestShape, User, constant, events, task  # noqa: E402

from bert_recsys import env, settings  # noqa: E402
from bert_recsys.client.errors import Kind, classify, status_code  # noqa: E402
from bert_recsys.client.triton import ServingView  # noqa: E402
from loadtest.workload import Workload  # noqa: E402

# Locust imports this file as its command: the LOADTEST_* variables (bert_recsys/env.py) are read here.
PROTOCOL = env.LOADTEST_PROTOCOL.get()
GRPC_URL = env.LOADTEST_GRPC_URL.get() or settings.SETTINGS.server.grpc_url
WEIGHTS = {name: int(weight) for name, weight in (item.split(":") for item in env.LOADTEST_TASKS.get().split(","))}
# A rejected request (HTTP 503 / gRPC UNAVAILABLE: Triton's queue policy shedding load) makes the simulated
# client back off like client.triton.RetryPolicy does, instead of hammering an overloaded server.
REJECTED_BACKOFF_S = env.LOADTEST_REJECTED_BACKOFF_S.get()
CANARY_SHARE = env.LOADTEST_CANARY_SHARE.get()
THINK_S = env.LOADTEST_THINK_MS.get() / 1000  # pause between a user's calls (0: closed loop)
CANARY_VIEW_TTL_S = 2.0
T = settings.SETTINGS.tensors
M = settings.SETTINGS.models
# Through the gateway, recommendations are computed by the gateway, not in this process.
WORKLOAD = Workload.load(with_recommender=PROTOCOL != "gateway" and WEIGHTS.get("recommend", 0) > 0, grpc_url=GRPC_URL)
GATEWAY_KEY = env.LOADTEST_GATEWAY_KEY.get() or env.GATEWAY_API_KEYS.get().split(",")[0].strip()
GATEWAY_USERS = 610  # MovieLens latest-small's user ids run 1..610; others get the cold-start list


@events.quitting.add_listener
def close_clients(environment, **_):
    if WORKLOAD.recommender is not None:
        WORKLOAD.recommender.client.close()


@events.quit.add_listener
def exit_now(exit_code, **_):
    # Statistics, CSV and HTML are written by now. gRPC's threads under gevent can block interpreter
    # shutdown indefinitely, so leave without waiting for them.
    os._exit(exit_code)


def fire(request_type: str, name: str, started: float, error: Exception | None, length: int = 0) -> None:
    events.request.fire(request_type=request_type, name=name, response_time=(time.perf_counter() - started) * 1000,
                        response_length=length, exception=error, context={})


class CanaryRoute:
    """Which ensemble a call goes to: CANARY_SHARE of them to the canary version's pinned ensemble
    (`embed_v3`) while the encoder config shows one, the rest to `embed`. One view per process, re-read
    every CANARY_VIEW_TTL_S with the caller's own connection."""

    version: int | None = None
    read_at = float("-inf")

    @classmethod
    def pick(cls, model: str, read_config) -> str:
        if CANARY_SHARE <= 0 or random.random() >= CANARY_SHARE:
            return model
        if time.monotonic() - cls.read_at > CANARY_VIEW_TTL_S:
            cls.read_at = time.monotonic()
            try:
                cls.version = ServingView.from_model_config(read_config()).canary
            except Exception:  # the view is advisory: without it, calls go to the stable ensemble
                cls.version = None
        return M.pinned(model, cls.version) if cls.version else model

    @classmethod
    def gone(cls) -> None:
        """The canary was promoted or rolled back under us: re-read the view on the next call."""
        cls.version, cls.read_at = None, float("-inf")


def recommend_once(user: User) -> None:
    started, error = time.perf_counter(), None
    try:
        WORKLOAD.recommend(random.choice(WORKLOAD.user_ids))
    except Exception as exc:  # counted as a failure by Locust
        error = exc
    fire("path", "recommend", started, error)


class TritonHttpUser(FastHttpUser):
    """KServe v2 JSON over HTTP, as any outside caller would send it."""

    abstract = PROTOCOL != "http"
    wait_time = constant(THINK_S)

    def _read_config(self):
        # Plain urllib (gevent-patched by Locust), so the view's reads stay out of the statistics.
        with urllib.request.urlopen(f"{self.host}/v2/models/{M.encoder}/config", timeout=10) as response:
            return json.loads(response.read())

    def _infer(self, model: str, body: dict, name: str) -> None:
        target = CanaryRoute.pick(model, self._read_config)
        with self.client.post(f"/v2/models/{target}/infer", json=body, name=name, catch_response=True) as response:
            if response.status_code == 404 and target != model:
                CanaryRoute.gone()  # promoted or rolled back since we looked: the stable ensemble answers
                response.success()
                self._infer(model, body, name)
                return
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
                if response.status_code == 503:
                    time.sleep(REJECTED_BACKOFF_S)  # gevent-patched: yields to other users

    @task(WEIGHTS.get("embed", 0))
    def embed(self):
        text = random.choice(WORKLOAD.texts)
        body = {"inputs": [{"name": T.text, "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
        self._infer(M.embed, body, "embed")

    @task(WEIGHTS.get("score", 0))
    def score(self):
        text = random.choice(WORKLOAD.texts)
        candidates = WORKLOAD.candidates()
        body = {"inputs": [
            {"name": T.text, "shape": [1, 1], "datatype": "BYTES", "data": [text]},
            {"name": T.candidates, "shape": [1, *candidates.shape], "datatype": "FP32", "data": candidates.ravel().tolist()},
        ], "outputs": [{"name": T.scores}]}
        self._infer(M.score, body, "score")

    @task(WEIGHTS.get("recommend", 0))
    def recommend(self):
        recommend_once(self)


class TritonGrpcUser(User):
    """tritonclient.grpc under gevent; one connection per simulated user, closed on stop."""

    abstract = PROTOCOL != "grpc"
    wait_time = constant(THINK_S)

    def on_start(self):
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.conn = grpcclient.InferenceServerClient(self.host or GRPC_URL)

    def on_stop(self):
        self.conn.close()

    def _read_config(self):
        return self.conn.get_model_config(M.encoder)

    def _infer(self, model: str, inputs: list, outputs: list[str], name: str) -> None:
        started, error = time.perf_counter(), None
        target = CanaryRoute.pick(model, self._read_config)
        requested = [self.grpc.InferRequestedOutput(o) for o in outputs]
        try:
            try:
                self.conn.infer(target, inputs, outputs=requested)
            except Exception as exc:
                if target == model or classify(exc) is not Kind.NOT_FOUND:
                    raise
                CanaryRoute.gone()  # promoted or rolled back since we looked: the stable ensemble answers
                self.conn.infer(model, inputs, outputs=requested)
        except Exception as exc:
            error = exc
        fire("grpc", name, started, error)
        if error is not None and status_code(error) == "UNAVAILABLE":
            time.sleep(REJECTED_BACKOFF_S)

    def _text_input(self):
        tensor = self.grpc.InferInput(T.text, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[random.choice(WORKLOAD.texts).encode()]], dtype=object))
        return tensor

    @task(WEIGHTS.get("embed", 0))
    def embed(self):
        self._infer(M.embed, [self._text_input()], [T.embedding], "embed")

    @task(WEIGHTS.get("score", 0))
    def score(self):
        candidates = WORKLOAD.candidates()[None]
        tensor = self.grpc.InferInput(T.candidates, list(candidates.shape), "FP32")
        tensor.set_data_from_numpy(candidates)
        self._infer(M.score, [self._text_input(), tensor], [T.scores], "score")

    @task(WEIGHTS.get("recommend", 0))
    def recommend(self):
        recommend_once(self)


class GatewayUser(FastHttpUser):
    """The HTTP gateway, as an application would call it: OpenAI-style embeddings and recommendations."""

    abstract = PROTOCOL != "gateway"
    wait_time = constant(THINK_S)

    def _post(self, path: str, body: dict, name: str) -> None:
        headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
        with self.client.post(path, json=body, headers=headers, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
                if response.status_code in (429, 503):
                    time.sleep(REJECTED_BACKOFF_S)

    @task(WEIGHTS.get("embed", 0))
    def embed(self):
        self._post("/v1/embeddings", {"model": M.embed, "input": random.choice(WORKLOAD.texts)}, "gw embed")

    @task(WEIGHTS.get("batch", 0))
    def batch(self):
        self._post("/v1/embeddings", {"model": M.embed, "input": random.sample(WORKLOAD.texts, 32)}, "gw embed b32")

    @task(WEIGHTS.get("recommend", 0))
    def recommend(self):
        self._post("/v1/recommendations", {"user_id": random.randint(1, GATEWAY_USERS), "n": 10}, "gw recommend")


class StepLoad(LoadTestShape):
    """LOADTEST_STEP=users,seconds,max: add `users` every `seconds` until `max`, hold one more step, stop."""

    abstract = not env.LOADTEST_STEP.is_set()

    def __init__(self):
        super().__init__()
        if env.LOADTEST_STEP.is_set():
            self.step_users, self.step_seconds, self.max_users = (int(x) for x in env.LOADTEST_STEP.get().split(","))

    def tick(self):
        run_time = self.get_run_time()
        steps = self.max_users // self.step_users
        if run_time > (steps + 1) * self.step_seconds:
            return None
        users = min(self.max_users, (int(run_time // self.step_seconds) + 1) * self.step_users)
        return users, self.step_users
