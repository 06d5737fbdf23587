"""`gptlab serve`: a model behind an OpenAI-compatible HTTP API, with a browser playground at `/`.

One thread owns the model. Request handlers on the event loop only validate, tokenize (in the thread
pool) and put jobs on that thread's queue, so generation never blocks the loop: /health answers while
a long completion runs. The worker batches waiting non-streamed requests that sample alike into one
`complete` call (a batch that fails is retried request by request, so one bad request cannot fail its
neighbours), and steps every open stream one piece at a time in turn, so streams share the model
fairly. A stream whose client goes away is cancelled before its next token.

The server never touches the filesystem on a request's behalf: the model is loaded once, from the
directory given on the command line, and a request's `model` is only compared with that model's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .checkpoint import load_pretrained
from .config import ServerLimits
from .errors import GptlabError
from .generation import Completion, SamplingParams, TextStream, complete
from .kernels import quantize_int8
from .tokenizers import document_start_ids
from .server_schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    ServerStats,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from .tokenizers import Tokenizer

logger = logging.getLogger("gptlab.server")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
MAX_STOP_STRINGS = 4  # as OpenAI's API


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


class _Counters:
    """ServerStats shared by the event loop and the worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = ServerStats()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def snapshot(self) -> ServerStats:
        with self._lock:
            return self._stats.model_copy()


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Hand a result to the event loop; a loop that has shut down no longer wants it."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


Choice = tuple[list[int], SamplingParams]  # one choice to generate: prompt ids and how to sample


@dataclass
class _CompletionJob:
    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future  # -> list[Completion], one per choice


@dataclass
class StreamJob:
    """One streamed request: its events arrive on `events`; `cancel()` stops its generation."""

    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    streams: list[TextStream] = field(default_factory=list)
    open: list[bool] = field(default_factory=list)  # per choice: still generating

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, *event: Any) -> None:
        _post(self.loop, self.events.put_nowait, event)


class GenerationWorker:
    """The one thread that runs the model, fed through a queue."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_batch: int, counters: _Counters) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.counters = counters
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptlab-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def waiting(self) -> int:
        """Jobs handed to the worker that it has not picked up yet."""
        return self._inbox.qsize()

    async def complete(self, choices: list[Choice]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        job = _CompletionJob(choices, loop, loop.create_future())
        self._inbox.put(job)
        return await job.future

    def open_stream(self, choices: list[Choice]) -> StreamJob:
        job = StreamJob(choices, asyncio.get_running_loop())
        self._inbox.put(job)
        return job

    def _run(self) -> None:
        streams: list[StreamJob] = []
        while True:
            waiting: list[_CompletionJob] = []
            try:
                # with no stream to step, sleep until work arrives; otherwise only look
                item = self._inbox.get(block=not streams)
                while True:
                    if item is None:
                        for job in streams:
                            self._close(job)
                        return
                    (streams if isinstance(item, StreamJob) else waiting).append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if waiting:
                self._complete_all(waiting)
            streams = [job for job in streams if self._step(job)]

    def _complete_all(self, jobs: list[_CompletionJob]) -> None:
        """Generate every choice of every waiting job, batching choices that sample alike; answer
        each job as soon as its last choice is done.

        Batching never changes a choice's text: `complete` gives each row the tokens it would get
        alone (a seeded row draws from its own generator).
        """
        results: dict[int, list[Completion | None]] = {id(job): [None] * len(job.choices) for job in jobs}
        unanswered = {id(job) for job in jobs}
        groups: dict[str, list[tuple[_CompletionJob, int]]] = {}
        for job in jobs:
            for k, (_, params) in enumerate(job.choices):
                groups.setdefault(repr(params), []).append((job, k))
        for items in groups.values():
            for start in range(0, len(items), self.max_batch):
                batch = [(job, k) for job, k in items[start:start + self.max_batch] if id(job) in unanswered]
                errors = self._generate(batch, results)
                for job in {id(job): job for job, _ in batch}.values():
                    if id(job) in errors:
                        _post(job.loop, _resolve, job.future, None, errors[id(job)])
                    elif all(r is not None for r in results[id(job)]):
                        _post(job.loop, _resolve, job.future, results[id(job)])
                    else:
                        continue
                    unanswered.discard(id(job))

    def _generate(self, items: list[tuple[_CompletionJob, int]],
                  results: dict[int, list[Completion | None]]) -> dict[int, BaseException]:
        """One `complete` call, filling `results`; the errors by job. If a call for several jobs
        fails, they are retried one by one so the failure lands only on the request that caused it."""
        if not items:
            return {}
        try:
            batch = complete(self.model, self.tokenizer, [job.choices[k][0] for job, k in items],
                             items[0][0].choices[items[0][1]][1])
        except Exception as exc:
            jobs = list({id(job): job for job, _ in items}.values())
            if len(jobs) == 1:
                logger.exception("generation failed")
                return {id(jobs[0]): exc}
            errors: dict[int, BaseException] = {}
            for job in jobs:
                errors.update(self._generate([(j, k) for j, k in items if j is job], results))
            return errors
        self.counters.add(batches=1, batched_rows=len(batch),
                          completion_tokens=sum(len(c.token_ids) for c in batch))
        for (job, k), completion in zip(items, batch):
            results[id(job)][k] = completion
        return {}

    def _step(self, job: StreamJob) -> bool:
        """Advance every open choice of a stream by one piece; False once the job is over."""
        if job.cancelled.is_set():
            self._close(job)
            self.counters.add(cancelled_streams=1)
            return False
        try:
            if not job.streams:
                job.streams = [TextStream(self.model, self.tokenizer, ids, params) for ids, params in job.choices]
                job.open = [True] * len(job.streams)
            for index, stream in enumerate(job.streams):
                if not job.open[index]:
                    continue
                try:
                    piece = next(stream)
                except StopIteration:
                    job.open[index] = False
                    self.counters.add(completion_tokens=stream.completion_tokens)
                    job.emit("finish", index, stream.finish_reason, stream.completion_tokens)
                else:
                    job.emit("piece", index, piece)
        except Exception as exc:
            logger.exception("streamed generation failed")
            self._close(job)
            job.emit("error", exc)
            return False
        if not any(job.open):
            job.emit("done")
            return False
        return True

    def _close(self, job: StreamJob) -> None:
        for stream, still_open in zip(job.streams, job.open):
            if still_open:
                stream.close()
                self.counters.add(completion_tokens=stream.completion_tokens)
        job.open = [False] * len(job.streams)


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413, by its Content-Length and by what arrives.

    The body is read here, up to the limit, before FastAPI parses it: a chunked upload that never
    declares its length is cut off at the limit too, and memory never holds more than that.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
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
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # from here on only the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes (--max-body-bytes)"
        await error_response(413, message, code="request_too_large")(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-Sent Events whose job is cancelled however the response ends: finished, failed, or
    cut off by a client that went away (Starlette cancels the body iterator or sees the send fail)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class _Plan:
    """A validated completion request, ready for the worker."""

    choices: list[Choice]  # in the API's order: prompt i's choice j has index i * n + j
    prompt_tokens: int


class CompletionService:
    """Turns API requests into generation jobs and their results back into API responses."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, model_id: str, limits: ServerLimits) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.limits = limits
        self.context = model.config.block_size
        self.created = int(time.time())
        self.counters = _Counters()
        self.worker = GenerationWorker(model, tokenizer, limits.max_batch, self.counters)

    # -- validation --------------------------------------------------------------------------------

    async def plan(self, body: CompletionRequest) -> _Plan:
        if body.model != self.model_id:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens < 0:
            raise ApiError(400, f"max_tokens must be at least 0, got {max_tokens}", param="max_tokens")
        if max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens must be at most {self.limits.max_tokens} (this server's limit), "
                                f"got {max_tokens}", param="max_tokens")
        n = 1 if body.n is None else body.n
        if n < 1:
            raise ApiError(400, f"n must be at least 1, got {n}", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(s == "" for s in stop):
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=body.seed,
            stop=tuple(stop),
        )
        try:
            params.validate()
        except ValueError as exc:  # its message starts with the field's name, the same as the API's
            raise ApiError(400, str(exc), param=str(exc).split()[0]) from None
        items = self._prompt_items(body.prompt)
        if len(items) * n > self.limits.max_choices:
            raise ApiError(400, f"{len(items)} prompt(s) x n={n} asks for {len(items) * n} choices; "
                                f"this server's limit is {self.limits.max_choices}", param="n")
        prompts = await run_in_threadpool(self._prompt_ids, items)
        choices = [(ids, self._choice_params(params, j)) for ids in prompts for j in range(n)]
        return _Plan(choices, sum(len(ids) for ids in prompts))

    @staticmethod
    def _choice_params(params: SamplingParams, j: int) -> SamplingParams:
        """With a seed, a prompt's choice j samples with seed + j: the n choices differ, and each
        is the same text whether streamed or not, batched or not."""
        if params.seed is None or j == 0:
            return params
        return replace(params, seed=(params.seed + j) % 2**64)

    @staticmethod
    def _prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        """The API's four prompt shapes as one list of prompts, each a string or token ids."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is an empty list; send a string, or a list of at least one", param="prompt")
        if all(isinstance(x, int) for x in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)

    def _prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        rows = []
        for i, item in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            try:
                ids = self.tokenizer.encode(item) if isinstance(item, str) else list(item)
                if ids and not isinstance(item, str):
                    self.tokenizer.decode_bytes(ids)  # the check that every id is in the vocabulary
            except GptlabError as exc:
                raise ApiError(400, f"{name}: {exc}", param="prompt") from None
            if not ids:
                ids = document_start_ids(self.tokenizer)
            if len(ids) > self.context:
                raise ApiError(400, f"{name} is {len(ids)} tokens; this model accepts at most {self.context}",
                               param="prompt", code="context_length_exceeded")
            rows.append(ids)
        return rows

    # -- responses --------------------------------------------------------------------------------

    def _chunk(self, request_id: str, created: int, choices: list[CompletionChoice],
               usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=request_id, created=created, model=self.model_id, choices=choices, usage=usage)

    async def respond(self, body: CompletionRequest) -> CompletionResponse | StreamingResponse:
        plan = await self.plan(body)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return await self._stream(plan, request_id, created, bool(body.stream_options and
                                                                      body.stream_options.include_usage))
        try:
            results = await self.worker.complete(plan.choices)
        except Exception:
            self.counters.add(failures=1)
            raise ApiError(500, "generation failed inside the server; see its log") from None
        self.counters.add(completions=1)
        choices = [CompletionChoice(text=c.text, index=i, finish_reason=c.finish_reason)
                   for i, c in enumerate(results)]
        completion_tokens = sum(len(c.token_ids) for c in results)
        usage = Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=plan.prompt_tokens + completion_tokens)
        return self._chunk(request_id, created, choices, usage)

    async def _stream(self, plan: _Plan, request_id: str, created: int, include_usage: bool) -> StreamingResponse:
        job = self.worker.open_stream(plan.choices)
        try:
            first = await job.events.get()
        except BaseException:
            job.cancel()
            raise
        if first[0] == "error":
            self.counters.add(failures=1)
            raise ApiError(500, "generation failed inside the server; see its log")
        self.counters.add(requests_in_flight=1)  # the response now owns the request until it closes

        def close() -> None:
            job.cancel()
            self.counters.add(requests_in_flight=-1)

        return EventStream(self._events(job, first, request_id, created, plan, include_usage), close)

    async def _events(self, job: StreamJob, event: tuple, request_id: str, created: int, plan: _Plan,
                      include_usage: bool) -> AsyncIterator[str]:
        completion_tokens = 0
        while True:
            kind = event[0]
            if kind == "piece":
                _, index, text = event
                yield _sse(self._chunk(request_id, created, [
                    CompletionChoice(text=text, index=index, finish_reason=None)]).model_dump())
            elif kind == "finish":
                _, index, reason, tokens = event
                completion_tokens += tokens
                yield _sse(self._chunk(request_id, created, [
                    CompletionChoice(text="", index=index, finish_reason=reason)]).model_dump())
            elif kind == "done":
                self.counters.add(completions=1)
                if include_usage:
                    usage = Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=plan.prompt_tokens + completion_tokens)
                    yield _sse(self._chunk(request_id, created, [], usage).model_dump())
                yield "data: [DONE]\n\n"
                return
            else:  # "error": the status line has gone out already, so the error travels as an event
                self.counters.add(failures=1)
                yield _sse({"error": {"message": "generation failed inside the server; see its log",
                                      "type": "server_error", "param": None, "code": None}})
                return
            event = await job.events.get()

    # -- tokenizer ---------------------------------------------------------------------------------

    def tokenize(self, text: str) -> TokenizeResponse:
        try:
            ids = self.tokenizer.encode(text)
        except GptlabError as exc:
            raise ApiError(400, f"text: {exc}", param="text") from None
        return TokenizeResponse(ids=ids, tokens=[self.tokenizer.decode([i]) for i in ids], count=len(ids))

    def detokenize(self, ids: list[int]) -> DetokenizeResponse:
        try:
            return DetokenizeResponse(text=self.tokenizer.decode(ids))
        except GptlabError as exc:
            raise ApiError(400, f"ids: {exc}", param="ids") from None


_ERRORS: dict[int | str, dict[str, Any]] = {
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

    streamed = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                      "description": "the completion; with `stream: true`, Server-Sent Events"}}

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, **streamed},
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

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, tags=["gptlab"],
              summary="Text to token ids, with each token's text")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await run_in_threadpool(service.tokenize, body.text)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, tags=["gptlab"],
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
          model_id: str | None = None, limits: ServerLimits = ServerLimits(), quantize: str | None = None) -> None:
    """Load the model once (int8-quantized with `quantize="int8"`) and serve it until interrupted."""
    model, tokenizer = load_pretrained(model_dir, device)
    if quantize == "int8":
        quantize_int8(model)
    name = model_id or Path(str(model_dir).rstrip("/")).name
    allowed = list(LOOPBACK_NAMES) if is_loopback(host) else None
    app = create_app(model, tokenizer, name, limits, allowed_hosts=allowed)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
