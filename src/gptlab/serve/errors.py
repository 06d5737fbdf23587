"""Every refusal of `gptlab serve` in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

OpenAI's client libraries turn that body into an exception carrying the message, so a client sees the
same kind of error from gptlab as from OpenAI, whatever went wrong: our own checks, FastAPI's
validation, a route or method that does not exist, or a failure inside the server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .schemas import ErrorResponse

logger = logging.getLogger("gptlab.serve")

_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A refusal with the HTTP status and the OpenAI-style error body the client will see."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "a value out of range, a prompt longer than the context, a body that is not UTF-8 or nests too "
              "deep, or a limit exceeded"),
        (404, "the model id is not the one this server serves, or no such route"),
        (405, "the route exists, with another method"),
        (413, "the request body is over --max-body-bytes"),
        (422, "a missing field, a wrong type, an unknown field or invalid JSON (the message names it)"),
        (429, "the queue is full (--max-queue); retry after the seconds in the Retry-After header"),
        (500, "generation failed inside the server; the server keeps serving"),
    ]
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem, led by the field it is about (and the list index, for an item)."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field_name = loc[0] if loc else None
    where = ".".join(loc[:1] + [p for p in loc[1:] if p.isdigit()]) or "body"
    return f"{where}: {first.get('msg', 'invalid value')}", field_name


def _framework_message(request: Request, exc: HTTPException) -> str:
    path = request.url.path
    if exc.status_code == 404:
        return f"no route {request.method} {path}; the API is listed at /docs"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or "another method"
        return f"{path} does not take {request.method}; use {allowed}"
    return f"{path}: {exc.detail}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(422, message, param, "invalid_type")

    @app.exception_handler(HTTPException)
    async def _framework(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, _framework_message(request, exc), code=code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        return error_response(500, "internal server error; see the server's log")
