"""The completions service: validates API requests, hands them to the worker, and shapes the responses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import torch
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..config import ServerLimits
from ..errors import GptlabError
from ..generation import SamplingParams
from ..tokenizers import Tokenizer, document_start_ids
from .errors import ApiError
from .schemas import (
    CompletionChoice, CompletionRequest, CompletionResponse, DetokenizeResponse, TokenizeResponse, Usage,
)
from .streaming import EventStream, sse
from .worker import Choice, Counters, GenerationWorker, StreamJob

MAX_STOP_STRINGS = 4  # as OpenAI's API


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
        self.counters = Counters()
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
                yield sse(self._chunk(request_id, created, [
                    CompletionChoice(text=text, index=index, finish_reason=None)]).model_dump())
            elif kind == "finish":
                _, index, reason, tokens = event
                completion_tokens += tokens
                yield sse(self._chunk(request_id, created, [
                    CompletionChoice(text="", index=index, finish_reason=reason)]).model_dump())
            elif kind == "done":
                self.counters.add(completions=1)
                if include_usage:
                    usage = Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=plan.prompt_tokens + completion_tokens)
                    yield sse(self._chunk(request_id, created, [], usage).model_dump())
                yield "data: [DONE]\n\n"
                return
            else:  # "error": the status line has gone out already, so the error travels as an event
                self.counters.add(failures=1)
                yield sse({"error": {"message": "generation failed inside the server; see its log",
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
