"""Domain errors of the service layer; `gateway.main` maps each to one JSON error body."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


class InvalidRequest(ApiError):
    status, code = 422, "invalid_request"


class UnknownModel(ApiError):
    status, code = 422, "unknown_model"


class InvalidPolicy(ApiError):
    status, code = 422, "invalid_policy"


class ContentPolicyViolation(ApiError):
    status, code = 400, "content_policy_violation"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"


class ServiceUnavailable(ApiError):
    status, code = 503, "service_unavailable"


def validation_message(exc: RequestValidationError) -> str:
    """A request's validation errors in one line: the field and what is wrong with it (the first five)."""
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            where, why = err.get("loc", ("body", "?"))[-1], (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON (at character {where}{': ' + why if why else ''})")
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"
