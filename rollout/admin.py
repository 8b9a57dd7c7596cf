"""The live servers' side of a rollout: keyed model control over gRPC, readiness, and Triton's metrics.

One `TritonAdmin` administers every replica serving the live repository (one server, or N pods sharing a
repository volume). Metrics are parsed with prometheus_client's own text-format parser.
"""
from __future__ import annotations

import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from bert_recsys.rollout.policy import MetricSnapshot
from bert_recsys.server.launcher import grpc_admin_headers
from bert_recsys.settings import ServerSettings

# Triton's per-model request counters: what canary verdicts and traffic shares are computed from.
COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_request_duration_us")


class AdminError(RuntimeError):
    """A replica refused or failed a model-control request (the message names the replica and the model)."""


@dataclass(frozen=True)
class Replica:
    grpc_url: str      # host:port of Triton's gRPC endpoint (model control, readiness)
    metrics_url: str   # host:port of its metrics endpoint


def replicas_from_file(path: Path) -> Callable[[], list[Replica]]:
    """A discovery function: the replicas listed in `path` now, one `GRPC_HOST:PORT,METRICS_HOST:PORT` per line
    (docker/k8s/rollout.sh keeps it current with the ready pods, so pods the HPA adds mid-rollout are reached)."""
    def read() -> list[Replica]:
        lines = Path(path).read_text().split()
        return [Replica(*line.split(",", 1)) for line in lines if "," in line]
    return read


def parse_metrics(text: str, into: MetricSnapshot | None = None) -> MetricSnapshot:
    """{(metric, model): value} for Triton's per-model counters in one /metrics text, summed over versions and
    other labels. Keys use Triton's names: the parser adds `_total` to a counter's samples, which is undone here."""
    values = {} if into is None else into
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = family.name if sample.name == f"{family.name}_total" else sample.name
            if name in COUNTERS and "model" in sample.labels:
                key = (name, sample.labels["model"])
                values[key] = values.get(key, 0.0) + float(sample.value)
    return values


class TritonAdmin:
    """A load goes to one replica at a time, and returns only once that replica has loaded it, so at most one
    replica is switching at any moment.

    Model control goes over gRPC, never HTTP: Triton 2.51's HTTP frontend serves a load request on one of its
    event threads for the whole load, and the inference requests of every connection on that thread wait
    behind it (measured: HTTP `embed` calls stalled for the full 4-5 s of an encoder reload; over gRPC the
    worst call during the same reload took 53 ms)."""

    def __init__(self, replicas: list[Replica], key: str, header: str = ServerSettings.admin_header,
                 discover: Callable[[], list[Replica]] | None = None):
        """`discover`, when given, is asked for the current replicas before every load, unload, readiness and
        metrics read (replicas that appeared are administered from then on; an empty answer keeps the last)."""
        self.headers = grpc_admin_headers(key, header)
        self.discover = discover
        self._clients: dict[Replica, grpcclient.InferenceServerClient] = {}
        self._use(list(replicas) or (discover() if discover else []))
        if not self.replicas:
            raise ValueError("no replicas to administer")

    def _use(self, replicas: list[Replica]) -> None:
        for gone in set(self._clients) - set(replicas):
            self._clients.pop(gone).close()
        for replica in replicas:
            if replica not in self._clients:
                self._clients[replica] = grpcclient.InferenceServerClient(replica.grpc_url)
        self.replicas = list(replicas)

    def refresh(self) -> list[Replica]:
        if self.discover is not None:
            found = self.discover()
            if found:
                self._use(found)
        return self.replicas

    @classmethod
    def single(cls, grpc_url: str, metrics_url: str, key: str, header: str = ServerSettings.admin_header) -> "TritonAdmin":
        return cls([Replica(grpc_url, metrics_url)], key, header)

    def _control(self, action: str, model: str) -> None:
        self.refresh()
        for replica, client in list(self._clients.items()):
            try:
                if action == "load":
                    client.load_model(model, headers=self.headers, client_timeout=900)
                else:
                    client.unload_model(model, headers=self.headers, client_timeout=900)
            except InferenceServerException as error:
                raise AdminError(f"{action} {model} on {replica.grpc_url}: {error.message()}") from None

    def load(self, model: str) -> None:
        self._control("load", model)

    def unload(self, model: str) -> None:
        self._control("unload", model)

    def ready(self, model: str) -> bool:
        """Ready on every replica."""
        self.refresh()
        try:
            return all(client.is_model_ready(model) for client in self._clients.values())
        except Exception:  # unreachable replica: not ready
            return False

    def metrics(self) -> MetricSnapshot:
        """Triton's per-model counters, summed over replicas."""
        values: MetricSnapshot = {}
        for replica in self.refresh():
            with urllib.request.urlopen(f"http://{replica.metrics_url}/metrics", timeout=10) as response:
                parse_metrics(response.read().decode(), into=values)
        return values

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
