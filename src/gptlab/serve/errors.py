"""Every refusal of `gptlab serve` in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

OpenAI's client libraries turn that body into an exception carrying the message, so a client sees the
same kind of error from gptlab as from OpenAI, whatever went wrong: our own checks, FastAPI's
validation, an unknown route, or a failure inside the server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .schemas import ErrorResponse

logger = logging.getLogger("gptlab.serve")


class ApiError(Exception):
    """A refusal with the HTTP status and the OpenAI-style error body the client will see."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "a value out of range, a prompt longer than the context, or a limit exceeded"),
        (404, "the model id is not the one this server serves"),
        (413, "the request body is over --max-body-bytes"),
        (422, "a missing field, a wrong type or an unknown field (the message names it)"),
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(422, message, param, "invalid_type")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        return error_response(500, "internal server error; see the server's log")
