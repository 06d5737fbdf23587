"""The ASGI application of `gptlab serve`: an OpenAI-compatible completions API, vLLM's tokenizer
endpoints, Prometheus metrics and a browser playground at `/`.

Request handlers on the event loop only check requests, tokenize (in the thread pool) and hand jobs
to the engine thread (serve/engine_thread.py), so generation never blocks the loop: /health answers
while a long completion runs.

The server never touches the filesystem on a request's behalf: the model is loaded once, from the
directory given on the command line, and a request's `model` is only compared with that model's id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from .limits import ServerLimits
from ..tokenizers import Tokenizer
from .errors import ERROR_RESPONSES, install_error_handlers
from .middleware import BodyChecks, HostCheck
from .schemas import (
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, Health, ModelCard, ModelList,
    TokenizeRequest, TokenizeResponse, TokenizerInfo, VllmDetokenizeResponse, VllmTokenizeResponse,
)
from .service import ClientGone, CompletionService

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"; no one reads it


def create_app(model: torch.nn.Module, tokenizer: Tokenizer, model_id: str,
               limits: ServerLimits = ServerLimits(), allowed_hosts: list[str] | None = None,
               on_start: Any = None) -> FastAPI:
    """The ASGI application; `allowed_hosts` (e.g. the loopback names) refuses other Host headers,
    which stops a web page from reaching a local server through DNS rebinding. `on_start()` runs once
    the engine thread is up (the command line prints where to go from there)."""
    service = CompletionService(model.eval(), tokenizer, model_id, limits)
    playground = (resources.files("gptlab") / "assets" / "playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.engine_thread.start()
        if on_start is not None:
            on_start()
        try:
            yield
        finally:
            service.engine_thread.stop()

    app = FastAPI(title="gptlab", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible completions API for a gptlab or GPT-2 model.")
    app.state.service = service
    install_error_handlers(app)

    streamed = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                      "description": "the completion; with `stream: true`, Server-Sent Events"}}

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **streamed},
              tags=["OpenAI"],
              summary="Complete one or more prompts; `stream: true` answers with Server-Sent Events")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """With `stream: true` the response is `text/event-stream`: one `data: {chunk}` event per
        piece of text (a chunk has the shape of the response, one choice, `finish_reason` null until
        that choice's last chunk), then `data: [DONE]`."""
        service.metrics.in_flight.inc()
        try:
            return await service.respond(body, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            service.metrics.in_flight.dec()

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"], summary="The one model served")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=service.created, context_length=service.context,
                                         max_tokens_limit=limits.max_tokens)])

    @app.get("/health", response_model=Health, tags=["gptlab"], summary="Liveness, with counters since start")
    async def health() -> Health:
        return Health(model=model_id, warm=service.engine_thread.warm, stats=service.metrics.stats())

    @app.get("/metrics", response_class=Response, tags=["gptlab"],
             summary="Prometheus metrics: requests, tokens, queue length, batch size, time to first token")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.post("/tokenize", response_model=TokenizeResponse | VllmTokenizeResponse, responses=ERROR_RESPONSES,
              tags=["gptlab"], summary="Text to token ids: `{text}` -> ids with each token's text; vLLM's "
                                       "`{prompt}` -> `{count, max_model_len, tokens}`")
    async def tokenize(body: TokenizeRequest) -> Any:
        return await run_in_threadpool(service.tokenize, body)

    @app.post("/detokenize", response_model=DetokenizeResponse | VllmDetokenizeResponse, responses=ERROR_RESPONSES,
              tags=["gptlab"], summary="Token ids back to text: `{ids}` -> `{text}`; vLLM's `{tokens}` -> `{prompt}`")
    async def detokenize(body: DetokenizeRequest) -> Any:
        return await run_in_threadpool(service.detokenize, body)

    @app.get("/tokenizer_info", response_model=TokenizerInfo, tags=["gptlab"],
             summary="vLLM's tokenizer description (lm-eval's remote tokenizer reads it)")
    async def tokenizer_info() -> TokenizerInfo:
        return service.tokenizer_info()

    @app.get("/", response_class=HTMLResponse, tags=["gptlab"], summary="The browser playground")
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    app.add_middleware(BodyChecks, max_bytes=limits.max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    return app
