"""API errors as data: one exception type, rendered into either dialect by the middleware."""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    """What went wrong, independent of dialect; each maps to a status and a per-dialect type."""

    INVALID_REQUEST = 400
    AUTHENTICATION = 401
    PERMISSION = 403
    NOT_FOUND = 404
    METHOD_NOT_ALLOWED = 405
    CONFLICT = 409  # the request lost to another (its agent was deleted while it ran)
    TOO_LARGE = 413
    RATE_LIMIT = 429
    INTERNAL = 500
    UNAVAILABLE = 503  # the process is going away (draining): retry elsewhere or later
    OVERLOADED = 529


class ApiError(Exception):
    """Raise anywhere in the HTTP layer; the error middleware turns it into the caller's dialect."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


class ModelLoadError(Exception):
    """The model could not be found or read; the message says which and why."""


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(Kind.INVALID_REQUEST, message, param=param)


def unsupported(what: str, param: str | None = None) -> ApiError:
    return invalid(f"{what} not supported yet by this server", param)


ANTHROPIC_TYPES = {
    Kind.INVALID_REQUEST: "invalid_request_error",
    Kind.AUTHENTICATION: "authentication_error",
    Kind.PERMISSION: "permission_error",
    Kind.NOT_FOUND: "not_found_error",
    Kind.METHOD_NOT_ALLOWED: "invalid_request_error",
    Kind.CONFLICT: "invalid_request_error",
    Kind.TOO_LARGE: "request_too_large",
    Kind.RATE_LIMIT: "rate_limit_error",
    Kind.INTERNAL: "api_error",
    Kind.UNAVAILABLE: "overloaded_error",
    Kind.OVERLOADED: "overloaded_error",
}

OPENAI_TYPES = {
    Kind.INVALID_REQUEST: ("invalid_request_error", None),
    Kind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    Kind.PERMISSION: ("invalid_request_error", "permission_denied"),
    Kind.NOT_FOUND: ("invalid_request_error", "not_found"),
    Kind.METHOD_NOT_ALLOWED: ("invalid_request_error", "method_not_allowed"),
    Kind.CONFLICT: ("invalid_request_error", "conflict"),
    Kind.TOO_LARGE: ("invalid_request_error", "request_too_large"),
    Kind.RATE_LIMIT: ("rate_limit_error", "rate_limit_exceeded"),
    Kind.INTERNAL: ("server_error", None),
    Kind.UNAVAILABLE: ("server_error", "service_unavailable"),
    Kind.OVERLOADED: ("server_error", "overloaded"),
}


def status_for(kind: Kind, anthropic: bool) -> int:
    """HTTP status: Anthropic says overloaded with 529, OpenAI clients expect 503."""
    if kind is Kind.OVERLOADED and not anthropic:
        return 503
    return kind.value


def anthropic_body(err: ApiError, request_id: str | None = None) -> dict:
    body = {"type": "error", "error": {"type": ANTHROPIC_TYPES[err.kind], "message": err.message}}
    if request_id:
        body["request_id"] = request_id
    return body


def openai_body(err: ApiError) -> dict:
    etype, code = OPENAI_TYPES[err.kind]
    return {"error": {"message": err.message, "type": etype, "param": err.param, "code": err.code or code}}
