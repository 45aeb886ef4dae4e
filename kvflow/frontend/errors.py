"""ApiError: every error the frontend returns, in OpenAI's `{"error": {...}}` shape."""

from __future__ import annotations

import math
import re

import msgspec

from kvflow.llm.openai import ErrorBody, ErrorResponse

_ENCODER = msgspec.json.Encoder()
# msgspec: "Expected `str`, got `int` - at `$.messages[0].role`"
_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")


class ApiError(Exception):
    """An error response: HTTP status plus the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        # Sent as a Retry-After header (whole seconds, at least 1) when set.
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        err = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return _ENCODER.encode(ErrorResponse(error=err))

    def headers(self) -> tuple[bytes, ...]:
        """Extra response header lines: WWW-Authenticate on 401, Retry-After when set."""
        lines: list[bytes] = []
        if self.status == 401:
            lines.append(b"www-authenticate: Bearer\r\n")
        if self.retry_after_s is not None:
            lines.append(b"retry-after: %d\r\n" % max(1, math.ceil(self.retry_after_s)))
        return tuple(lines)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_decode_error(exc: msgspec.DecodeError) -> ApiError:
    """Turn a msgspec decode/validation failure into a 400 naming the offending field."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return bad_request(f"Request body is not valid JSON ({text}); send a JSON object.")
    match = _AT_PATH.match(text)
    assert match is not None  # the pattern matches any string
    detail, path = match.group("msg"), match.group("path") or ""
    missing = _MISSING.search(detail)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
        return bad_request(f"Missing required parameter '{path}'.", param=path)
    if not path:
        return bad_request(f"Invalid request body: {detail}; send a JSON object.")
    return bad_request(f"Invalid value for '{path}': {detail}.", param=path)


def model_not_found(name: str, available: list[str]) -> ApiError:
    known = ", ".join(available) if available else "none are being served yet"
    return ApiError(
        404,
        f"The model '{name}' does not exist. Available models: {known}.",
        param="model",
        code="model_not_found",
    )


def no_workers(name: str, detail: str = "", retry_after_s: float = 2.0) -> ApiError:
    why = f" ({detail})" if detail else ""
    return ApiError(
        503,
        f"No live worker is serving model '{name}' right now{why}; retry once a worker is up.",
        type="service_unavailable_error",
        code="no_workers",
        retry_after_s=retry_after_s,
    )


def engine_failed(detail: str) -> ApiError:
    return ApiError(
        500, f"The engine failed while generating: {detail}", type="server_error", code="engine"
    )


def overloaded(name: str, detail: str, retry_after_s: float) -> ApiError:
    return ApiError(
        503,
        f"Every worker serving model '{name}' is busy ({detail}); retry after "
        f"{retry_after_s:g} s.",
        type="service_unavailable_error",
        code="overloaded",
        retry_after_s=retry_after_s,
    )


def too_many_requests(message: str, retry_after_s: float) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                    retry_after_s=retry_after_s)


def worker_lost(detail: str) -> ApiError:
    """The request's worker went away and the request could not be moved to another one."""
    return ApiError(503, detail, type="service_unavailable_error", code="worker_lost")
