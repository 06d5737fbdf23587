"""`gptlab serve`: a model behind an OpenAI-compatible HTTP API, with a browser playground at `/`.

One thread owns the model. Request handlers on the event loop only validate, tokenize (in the thread
pool) and put jobs on that thread's queue, so generation never blocks the loop: /health answers while
a long completion runs.

The server never touches the filesystem on a request's behalf: the model is loaded once, from the
directory given on the command line, and a request's `model` is only compared with that model's id.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..checkpoint import load_pretrained
from ..config import ServerLimits
from ..tokenizers import Tokenizer
from .errors import ERROR_RESPONSES, install_error_handlers
from .middleware import BodyLimit
from .schemas import (
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, Health, ModelCard, ModelList, TokenizeRequest,
    TokenizeResponse,
)
from .service import CompletionService

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def create_app(model: torch.nn.Module, tokenizer: Tokenizer, model_id: str,
               limits: ServerLimits = ServerLimits(), allowed_hosts: list[str] | None = None) -> FastAPI:
    """The ASGI application; `allowed_hosts` (e.g. the loopback names) refuses other Host headers,
    which stops a web page from reaching a local server through DNS rebinding."""
    service = CompletionService(model.eval(), tokenizer, model_id, limits)
    playground = (resources.files("gptlab") / "assets" / "playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()

    app = FastAPI(title="gptlab", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible completions API for a gptlab or GPT-2 model.")
    app.state.service = service

    install_error_handlers(app)

    streamed = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                      "description": "the completion; with `stream: true`, Server-Sent Events"}}

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **streamed},
              tags=["OpenAI"],
              summary="Complete one or more prompts; `stream: true` answers with Server-Sent Events")
    async def completions(body: CompletionRequest) -> Any:
        """With `stream: true` the response is `text/event-stream`: one `data: {chunk}` event per
        piece of text (a chunk has the shape of the response, one choice, `finish_reason` null until
        that choice's last chunk), then `data: [DONE]`."""
        service.counters.add(requests_in_flight=1)
        try:
            return await service.respond(body)
        finally:
            service.counters.add(requests_in_flight=-1)

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"], summary="The one model served")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=service.created, context_length=service.context,
                                         max_tokens_limit=limits.max_tokens)])

    @app.get("/health", response_model=Health, tags=["gptlab"], summary="Liveness, with counters since start")
    async def health() -> Health:
        return Health(model=model_id, stats=service.counters.snapshot())

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES, tags=["gptlab"],
              summary="Text to token ids, with each token's text")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await run_in_threadpool(service.tokenize, body.text)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES, tags=["gptlab"],
              summary="Token ids back to text")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await run_in_threadpool(service.detokenize, body.ids)

    @app.get("/", response_class=HTMLResponse, tags=["gptlab"], summary="The browser playground")
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread of this process and yield its base URL; port 0 picks a free port.

    For tests, benchmarks and notebooks: the socket is bound before uvicorn starts, so the port
    cannot be taken in between.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gptlab-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        bound = sock.getsockname()[1]
        yield f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str | torch.device = "cpu",
          model_id: str | None = None, limits: ServerLimits = ServerLimits()) -> None:
    """Load the model once and serve it until interrupted."""
    model, tokenizer = load_pretrained(model_dir, device)
    name = model_id or Path(str(model_dir).rstrip("/")).name
    allowed = list(LOOPBACK_NAMES) if is_loopback(host) else None
    app = create_app(model, tokenizer, name, limits, allowed_hosts=allowed)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
