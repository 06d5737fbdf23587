"""ASGI middleware, answering in OpenAI's error shape like every other refusal: `HostCheck` refuses a
Host header the server does not answer to (400), and `BodyChecks` reads a request's body before FastAPI
parses it and refuses the bodies it would not parse well: over the size limit (413), not UTF-8, or
nested deeper than any request needs (400)."""

from __future__ import annotations

import json
import urllib.parse

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

MAX_JSON_DEPTH = 32  # the deepest valid request nests 3 levels ({"prompt": [[ids]]})


class HostCheck:
    """Serve only requests whose Host header names one of `allowed` (with any port): a web page that
    rebinds its own DNS name to 127.0.0.1 still sends its own name, so it cannot reach a local server.

    (Starlette's TrustedHostMiddleware does the same job but answers in plain text.)"""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {name.strip("[]").lower() for name in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(host) not in self.allowed:
            message = (f"this server does not answer to the host {host!r}; use one of "
                       f"{', '.join(sorted(self.allowed))}")
            await error_response(400, message, code="invalid_host")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_name(host: str) -> str | None:
    """A Host header's name without its port: "[::1]:8000" -> "::1", "LocalHost:80" -> "localhost"."""
    try:
        return urllib.parse.urlsplit("//" + host.strip()).hostname
    except ValueError:  # e.g. an unclosed "["
        return None


class BodyChecks:
    """The body is read here, up to `max_bytes`, by its Content-Length and by what arrives: a chunked
    upload that never declares its length is cut off at the limit too, and memory never holds more."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = unparseable(body)
        if problem:
            await error_response(400, problem, code="invalid_body")(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # from here on only the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes (--max-body-bytes)"
        await error_response(413, message, code="request_too_large")(scope, receive, send)


def unparseable(body: bytes) -> str | None:
    """Why the body cannot be read as a request, if it is not UTF-8 or nests too deep; None otherwise
    (invalid JSON is left to FastAPI, which names the place)."""
    if not body:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the body is not UTF-8: byte 0x{body[exc.start]:02x} at position {exc.start}"
    try:
        value = json.loads(text)
    except RecursionError:
        return f"the body nests deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:
        return None
    containers = [(value, 1)]  # (a dict or list, how deep it sits); scalars add no depth
    while containers:
        item, depth = containers.pop()
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            return f"the body nests deeper than {MAX_JSON_DEPTH} levels"
        containers.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return None
