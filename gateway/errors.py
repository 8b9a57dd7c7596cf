"""The gateway's one error type, answered in OpenAI's shape, and the HTTP status each of Triton's failures
(already typed by client.errors where they arose) becomes."""
from __future__ import annotations

from starlette.responses import JSONResponse

from bert_recsys.client.errors import InvalidRequest, ModelNotFound, ServingError, ServingTimeout, Unavailable

RETRY_AFTER_UNAVAILABLE_S = 1


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status` and `headers`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def http_error(error: ServingError | InvalidRequest) -> ApiError:
    """Triton's failure as the HTTP status the caller gets: its queue policy or an outage -> 503 with
    Retry-After, a timeout -> 504, a refused request -> 400, a model that is not loaded -> 404, anything else -> 502."""
    if isinstance(error, ModelNotFound):
        return ApiError(404, str(error), code="model_not_found")
    if isinstance(error, InvalidRequest):
        return ApiError(400, str(error), param="input")
    if isinstance(error, Unavailable):
        return ApiError(503, f"the model server is overloaded or down: {error}", type_="server_error",
                        code="unavailable", headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})
    if isinstance(error, ServingTimeout):
        return ApiError(504, str(error), type_="server_error", code="timeout")
    return ApiError(502, str(error), type_="server_error", code="model_failed")
