"""The gateway's errors: every refusal is JSON with a code, a one-line message (the CLI's words) and,
where fields are at fault, each field's path and reason.

    {"error": {"code": "invalid_job", "message": "0.width: ...", "problems": [{"field": "0.width", "reason": "..."}]}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxfarm.producer.redis_room import RedisFull
from fluxfarm.shared.errors import FarmError, InvalidJob, JobConflict, QuotaExceeded


class Problem(BaseModel):
    field: str
    reason: str


class ErrorBody(BaseModel):
    code: str
    message: str
    problems: list[Problem] = []


class ErrorResponse(BaseModel):
    """What every non-2xx answer of the gateway holds (in the OpenAPI document as such)."""

    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route or router that may refuse with these statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}


class ApiError(Exception):
    """A refusal with its HTTP status: raised by the routes, answered by `install_error_handlers`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _answer(status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(mode="json"), status_code=status, headers=headers)


def _problems(pairs: tuple[tuple[str, str], ...]) -> list[Problem]:
    return [Problem(field=field, reason=reason) for field, reason in pairs]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _answer(error.status, ErrorBody(code=error.code, message=error.message), error.headers)

    @app.exception_handler(InvalidJob)
    async def invalid_job(_: Request, error: InvalidJob) -> JSONResponse:
        code = "job_conflict" if isinstance(error, JobConflict) else "invalid_job"
        return _answer(422, ErrorBody(code=code, message=str(error), problems=_problems(error.problems)))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        pairs = tuple(
            (".".join(str(part) for part in problem["loc"]), str(problem["msg"])) for problem in error.errors()
        )
        message = "; ".join(f"{field}: {reason}" for field, reason in pairs)
        return _answer(422, ErrorBody(code="invalid_request", message=message, problems=_problems(pairs)))

    @app.exception_handler(QuotaExceeded)
    async def quota_exceeded(_: Request, error: QuotaExceeded) -> JSONResponse:
        return _answer(429, ErrorBody(code="quota_exceeded", message=str(error)), {"Retry-After": "30"})

    @app.exception_handler(RedisFull)
    async def redis_full(_: Request, error: RedisFull) -> JSONResponse:
        if not error.drains:  # nothing queued or running would free room: a retry cannot succeed until an operator acts
            return _answer(507, ErrorBody(code="farm_full_idle", message=str(error)))
        return _answer(503, ErrorBody(code="farm_full", message=str(error)), {"Retry-After": "60"})

    @app.exception_handler(FarmError)
    async def farm_error(_: Request, error: FarmError) -> JSONResponse:
        return _answer(400, ErrorBody(code="refused", message=str(error)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _answer(error.status_code, ErrorBody(code=code, message=str(error.detail)), error.headers)
