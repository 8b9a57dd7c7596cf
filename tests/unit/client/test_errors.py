"""Errors are classified once, from Triton's status codes and exception types, never from message text."""
from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from bert_recsys.client.errors import (InvalidRequest, Kind, ModelNotFound, ServingError, ServingTimeout, Unavailable, classify,
                           status_code)
from bert_recsys.client.triton import RetryPolicy, TritonClient


def server_error(status: str | None, text: str = "whatever the server says") -> InferenceServerException:
    return InferenceServerException(msg=text, status=status)


@pytest.mark.parametrize("status, kind", [
    # gRPC codes, as tritonclient.grpc reports them, and the HTTP statuses tritonclient.http reports.
    ("StatusCode.NOT_FOUND", Kind.NOT_FOUND), ("404", Kind.NOT_FOUND),
    ("StatusCode.INVALID_ARGUMENT", Kind.INVALID), ("400", Kind.INVALID),
    ("StatusCode.UNAVAILABLE", Kind.RETRY), ("503", Kind.RETRY), ("StatusCode.RESOURCE_EXHAUSTED", Kind.RETRY),
    ("429", Kind.RETRY),
    ("StatusCode.DEADLINE_EXCEEDED", Kind.TIMEOUT),
    ("StatusCode.INTERNAL", Kind.FAILED), ("500", Kind.FAILED), ("StatusCode.UNKNOWN", Kind.FAILED),
    (None, Kind.INVALID),  # never reached the server: tritonclient refused to build the request
])
def test_status_codes_decide(status, kind):
    assert classify(server_error(status)) is kind


def test_message_text_plays_no_part():
    # Triton's own words for an unknown model, under another status, do not make it a missing model ...
    assert classify(server_error("StatusCode.INVALID_ARGUMENT", "Request for unknown model: 'x' is not found")) is Kind.INVALID
    # ... and a NOT_FOUND worded differently (a future Triton) still is one.
    assert classify(server_error("StatusCode.NOT_FOUND", "no such model")) is Kind.NOT_FOUND
    assert status_code(server_error("StatusCode.NOT_FOUND")) == "NOT_FOUND" and status_code(server_error("404")) == "404"


def test_transport_failures_and_foreign_errors():
    assert classify(ConnectionRefusedError(111, "refused")) is Kind.RETRY
    assert classify(ConnectionResetError()) is Kind.RETRY
    assert classify(TimeoutError()) is Kind.TIMEOUT
    assert classify(ValueError("a bug")) is Kind.FOREIGN


def test_the_hierarchy_callers_rely_on():
    assert issubclass(ModelNotFound, InvalidRequest) and issubclass(InvalidRequest, ValueError)
    assert issubclass(Unavailable, ServingError) and issubclass(ServingTimeout, ServingError)


@pytest.mark.parametrize("raised, expected, calls", [
    (server_error("StatusCode.NOT_FOUND"), ModelNotFound, 1),
    (server_error("400"), InvalidRequest, 1),
    (server_error("StatusCode.INTERNAL"), ServingError, 1),
    (server_error("StatusCode.DEADLINE_EXCEEDED"), ServingTimeout, 1),
    (server_error("503"), Unavailable, 3),          # retried, then given up
    (ConnectionRefusedError(111, "refused"), Unavailable, 3),
])
def test_the_client_raises_one_type_per_kind(raised, expected, calls):
    client = TritonClient("127.0.0.1:1", retry=RetryPolicy(attempts=3, initial_backoff_s=0.001))
    attempts = []

    def failing():
        attempts.append(1)
        raise raised

    with pytest.raises(expected) as caught:
        client._call("infer embed", failing)
    assert len(attempts) == calls and "infer embed" in str(caught.value)
    assert type(caught.value) is expected


def test_a_foreign_exception_passes_through_untouched():
    client = TritonClient("127.0.0.1:1")
    with pytest.raises(KeyError):
        client._call("infer", lambda: {}["missing"])
