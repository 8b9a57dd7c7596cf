"""Locust users against a Triton deployment of this project: `embed`, `score` and the whole recommend path.

    LOADTEST_PROTOCOL=http|grpc  which protocol the embed/score users speak (default http)
    LOADTEST_GRPC_URL=host:port  where the recommend path's gRPC client goes (default 127.0.0.1:8001)
    LOADTEST_TASKS=embed:6,score:3,recommend:1   task weights (0 disables a task)
    LOADTEST_STEP=users,seconds,max_users        step-load shape instead of a fixed user count

Request texts are real: STS-B sentences and MovieLens titles when ../shared/data is there, else this
project's own gate sentences. Run it through `python -m loadtest.run` (or `make loadtest`).
"""
from __future__ import annotations

# gRPC under gevent needs this before anything imports grpc (tritonclient.grpc does).
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from locust import FastHttpUser, LoadTestShape, User, constant, events, task  # noqa: E402

import settings  # noqa: E402
from loadtest.workload import Workload  # noqa: E402

PROTOCOL = os.environ.get("LOADTEST_PROTOCOL", "http")
GRPC_URL = os.environ.get("LOADTEST_GRPC_URL", settings.SETTINGS.server.grpc_url)
WEIGHTS = {name: int(weight) for name, weight in
           (item.split(":") for item in os.environ.get("LOADTEST_TASKS", "embed:6,score:3,recommend:1").split(","))}
# A rejected request (HTTP 503 / gRPC UNAVAILABLE: Triton's queue policy shedding load) makes the simulated
# client back off like client.triton.RetryPolicy does, instead of hammering an overloaded server.
REJECTED_BACKOFF_S = float(os.environ.get("LOADTEST_REJECTED_BACKOFF_S", "0.05"))
T = settings.SETTINGS.tensors
M = settings.SETTINGS.models
WORKLOAD = Workload.load(with_recommender=WEIGHTS.get("recommend", 0) > 0, grpc_url=GRPC_URL)


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
    wait_time = constant(0)

    def _infer(self, model: str, body: dict, name: str) -> None:
        with self.client.post(f"/v2/models/{model}/infer", json=body, name=name, catch_response=True) as response:
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
    wait_time = constant(0)

    def on_start(self):
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.conn = grpcclient.InferenceServerClient(self.host or GRPC_URL)

    def on_stop(self):
        self.conn.close()

    def _infer(self, model: str, inputs: list, outputs: list[str], name: str) -> None:
        started, error = time.perf_counter(), None
        try:
            self.conn.infer(model, inputs, outputs=[self.grpc.InferRequestedOutput(o) for o in outputs])
        except Exception as exc:
            error = exc
        fire("grpc", name, started, error)
        if error is not None and "UNAVAILABLE" in str(getattr(error, "status", lambda: "")()):
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


class StepLoad(LoadTestShape):
    """LOADTEST_STEP=users,seconds,max: add `users` every `seconds` until `max`, hold one more step, stop."""

    abstract = "LOADTEST_STEP" not in os.environ

    def __init__(self):
        super().__init__()
        if "LOADTEST_STEP" in os.environ:
            self.step_users, self.step_seconds, self.max_users = (int(x) for x in os.environ["LOADTEST_STEP"].split(","))

    def tick(self):
        run_time = self.get_run_time()
        steps = self.max_users // self.step_users
        if run_time > (steps + 1) * self.step_seconds:
            return None
        users = min(self.max_users, (int(run_time // self.step_seconds) + 1) * self.step_users)
        return users, self.step_users
