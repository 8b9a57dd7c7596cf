"""The serving client's errors, classified once, where they arise (`client.triton.TritonClient._call`), from
Triton's status codes (gRPC codes, HTTP statuses) and exception types, never from message text. Callers catch
these types.

    ServingError              the server could not serve the call (it failed it, e.g. a dead stub: INTERNAL)
    ├── Unavailable           down, unreachable or shedding load (UNAVAILABLE/503, 429...) through every retry
    └── ServingTimeout        no answer within the client's timeout; not retried
    InvalidRequest            the request itself was refused (INVALID_ARGUMENT/400); retrying cannot help
    └── ModelNotFound         no such model or version is loaded (NOT_FOUND/404): e.g. a canary that was just
                              promoted or rolled back, or a pinned version that was retired
"""
from __future__ import annotations

from enum import Enum


class ServingError(RuntimeError):
    """Triton could not serve the call: down or overloaded through every retry, or the model failed it (INTERNAL,
    e.g. a model whose stub process died; server/supervisor.py reloads such a model)."""


class Unavailable(ServingError):
    """The server is down, unreachable or rejecting work (its queue policy) through every retry."""


class ServingTimeout(ServingError):
    """No answer within the client's timeout (a model that hangs, or a server too overloaded to answer).
    Not retried: the server may still be working on the request, and a retry would queue a second copy."""


class InvalidRequest(ValueError):
    """Triton rejected the request itself (bad text, wrong shape, a model that is not loaded): retrying cannot help."""


class ModelNotFound(InvalidRequest):
    """The model, or the model version, is not loaded (Triton's NOT_FOUND, HTTP 404)."""


class Kind(Enum):
    """What a failure from tritonclient means for the caller."""

    RETRY = "retry"            # transient: back off and try again on a fresh connection
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    FAILED = "failed"          # the server answered with an error of its own
    FOREIGN = "foreign"        # not a serving failure at all (a bug, a TypeError...): let it through


# tritonclient reports gRPC codes as "StatusCode.UNAVAILABLE" and HTTP statuses as "503".
_BY_STATUS = {
    "UNAVAILABLE": Kind.RETRY, "RESOURCE_EXHAUSTED": Kind.RETRY, "503": Kind.RETRY, "429": Kind.RETRY,
    "502": Kind.RETRY, "504": Kind.RETRY,
    "DEADLINE_EXCEEDED": Kind.TIMEOUT,
    "NOT_FOUND": Kind.NOT_FOUND, "404": Kind.NOT_FOUND,
    "INVALID_ARGUMENT": Kind.INVALID, "400": Kind.INVALID, "413": Kind.INVALID,
}


def status_code(error: BaseException) -> str:
    """The bare status of a tritonclient error ("UNAVAILABLE", "503"), or "" when it carries none."""
    status = getattr(error, "status", None)
    text = str((status() if callable(status) else status) or "")
    return text.rsplit(".", 1)[-1] if text.startswith("StatusCode.") else text


def classify(error: BaseException) -> Kind:
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        code = status_code(error)
        if code:
            return _BY_STATUS.get(code, Kind.FAILED)
        # Without a status it never reached the server: tritonclient refused to build the request (a tensor it
        # cannot serialize, a bad argument). Connection failures come as OSError (HTTP) or UNAVAILABLE (gRPC).
        return Kind.INVALID
    if isinstance(error, TimeoutError) or type(error).__name__ == "Timeout":  # sockets, gevent's too
        return Kind.TIMEOUT
    if isinstance(error, OSError):  # refused, reset, unreachable (ConnectionError is an OSError)
        return Kind.RETRY
    return Kind.FOREIGN


def message(error: BaseException) -> str:
    text = error.message() if callable(getattr(error, "message", None)) else str(error)
    return text or type(error).__name__
