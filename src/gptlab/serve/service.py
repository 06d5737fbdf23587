"""The completions service: checks API requests, hands them to the engine thread as jobs, and shapes the
answers (whole, or as Server-Sent Events). Everything here runs on the event loop or its thread pool;
only the engine thread touches the model."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .limits import ServerLimits
from ..errors import GptlabError
from ..inference import Completion, Engine, SamplingParams, failure_cause
from ..tokenizers import Tokenizer, document_start_ids
from .engine_thread import Choice, EngineThread, Job, QueueFull
from .errors import ApiError, error_body
from .logprobs import OffsetCounter, api_logprobs, joined
from .metrics import Metrics
from .schemas import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenizerInfo, Usage, VllmDetokenizeResponse,
    VllmTokenizeResponse,
)
from .streaming import EventStream, sse

MAX_STOP_STRINGS = 4  # as OpenAI's API
RETRY_AFTER_SECONDS = 1  # what a 429 asks the client to wait


class ClientGone(Exception):
    """The client closed the connection before its answer was ready; its job is cancelled."""


@dataclass
class Plan:
    """A checked completion request, ready for the engine."""

    choices: list[Choice]  # in the API's order: prompt i's choice j has index i * n + j
    prompt_texts: list[str]  # per choice: its prompt's ids decoded, which `echo` puts before the completion
    prompt_tokens: int
    echo: bool
    logprobs: int | None


class CompletionService:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, model_id: str, limits: ServerLimits) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.limits = limits
        self.context = model.config.block_size
        self.created = int(time.time())
        self.metrics = Metrics()
        self.engine = Engine(model, tokenizer, max_batch=limits.max_batch, kv_cache_bytes=limits.kv_cache_mb * 2**20,
                             grow_ahead=True)
        # batch size 1's kernels are measured before the server listens, the others' once it waits
        plan = self.engine.warm_up_plan()
        self.engine.warm_up(plan[:1])
        self.engine_thread = EngineThread(self.engine, self.metrics, limits.max_queue, warm_ups=plan[1:])

    # -- checks ---------------------------------------------------------------------------------------

    async def plan(self, body: CompletionRequest) -> Plan:
        self.check_model(body.model)
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
        echo = bool(body.echo)
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(body.logit_bias),
            seed=body.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            min_tokens=body.min_tokens or 0,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if echo else None,
        )
        try:
            params.validate()
        except ValueError as exc:
            raise self._refusal(exc) from None
        items = self._prompt_items(body.prompt)
        if len(items) * n > self.limits.max_choices:
            raise ApiError(400, f"{len(items)} prompt(s) x n={n} asks for {len(items) * n} choices; "
                                f"this server's limit is {self.limits.max_choices}", param="n")
        if len(items) * n > self.limits.max_queue:  # a 429 would ask the client to retry what can never fit
            raise ApiError(400, f"{len(items)} prompt(s) x n={n} asks for {len(items) * n} choices, more than "
                                f"the {self.limits.max_queue} that may wait at once (--max-queue)", param="n")
        prompts = await run_in_threadpool(self._prompt_ids, items)
        for ids in prompts:
            try:
                self.engine.check(ids, params)
            except ValueError as exc:
                raise self._refusal(exc) from None
        texts = [self.tokenizer.decode(ids) for ids in prompts] if echo else [""] * len(prompts)
        choices = [(ids, self._choice_params(params, j)) for ids in prompts for j in range(n)]
        return Plan(choices, [text for text in texts for _ in range(n)], sum(map(len, prompts)), echo, body.logprobs)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    @staticmethod
    def _refusal(exc: ValueError) -> ApiError:
        """A sampling parameter's ValueError (its message starts with the field) as the API's 400."""
        message = str(exc).replace("max_new_tokens", "max_tokens").replace("prompt_logprobs", "logprobs")
        param = message.split()[0]
        if param in ("the", "prompt"):
            param = "prompt"
        return ApiError(400, message, param=param)

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's keys are token ids written in ASCII digits. str.isdigit() and int() also take other
        scripts' digits ("٣" is 3) and superscripts ("²", which int() then refuses), so ASCII is asked for;
        the length is checked before int() reads a number it would refuse (over 4,300 digits)."""
        if not bias:
            return None
        vocab = self.tokenizer.vocab_size
        for key in bias:
            if not (key.isascii() and key.isdigit()):
                raise ApiError(400, f"logit_bias keys must be token ids in ASCII digits, got {key!r}",
                               param="logit_bias")
            if len(key.lstrip("0")) > len(str(vocab)) or int(key) >= vocab:
                raise ApiError(400, f"logit_bias key {key[:20]!r} is outside the vocabulary (ids 0 to {vocab - 1})",
                               param="logit_bias")
        return {int(key): value for key, value in bias.items()}

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
                ids = self.encode(item) if isinstance(item, str) else list(item)
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

    def encode(self, text: str) -> list[int]:
        """Text to ids, with the end-of-text marker (`<|endoftext|>` for GPT-2) as its one special id, the
        way OpenAI, vLLM and Hugging Face's tokenizer read a string prompt."""
        eos = self.tokenizer.eos_id
        if eos is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(self.tokenizer.decode([eos]))):
            if i:
                ids.append(eos)
            if part:
                ids.extend(self.tokenizer.encode(part))
        return ids

    # -- answers --------------------------------------------------------------------------------------

    async def respond(self, body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
        plan = await self.plan(body)
        job = Job(plan.choices, asyncio.get_running_loop(), stream=bool(body.stream))
        try:
            self.engine_thread.submit(job)
        except QueueFull:
            self.metrics.requests.labels("rejected").inc()
            raise ApiError(429, f"the server is busy: {self.limits.max_queue} sequences already wait for a place in "
                                f"the batch (--max-queue); retry in {RETRY_AFTER_SECONDS} s", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        self.metrics.prompt_tokens.inc(plan.prompt_tokens)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(plan, job, request, request_id, created, include_usage)
        event = await self._or_gone(request, job, job.events.get())
        if event[0] == "error":
            self.metrics.requests.labels("failed").inc()
            raise ApiError(500, _failed(event[1]))
        self.metrics.requests.labels("completed").inc()
        self.metrics.request_seconds.observe(time.perf_counter() - job.arrived)
        results: list[Completion] = event[1]
        choices = [CompletionChoice(text=(plan.prompt_texts[i] if plan.echo else "") + c.text, index=i,
                                    logprobs=self._logprobs(plan, c), finish_reason=c.finish_reason)
                   for i, c in enumerate(results)]
        completion_tokens = sum(len(c.token_ids) for c in results)
        usage = Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=plan.prompt_tokens + completion_tokens)
        return self._chunk(request_id, created, choices, usage)

    def _logprobs(self, plan: Plan, c: Completion) -> CompletionLogprobs | None:
        if plan.logprobs is None:
            return None
        offsets = OffsetCounter(self.tokenizer)
        spans = [c.prompt_logprobs] if plan.echo else []
        return joined([api_logprobs(self.tokenizer, span, offsets) for span in spans + [c.logprobs or []]])

    async def _or_gone(self, request: Request, job: Job, waiting: Awaitable[Any]) -> Any:
        """Await `waiting`, or cancel the job as soon as the client hangs up (raising ClientGone)."""
        result = asyncio.ensure_future(waiting)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is stopping the handler
            self.engine_thread.cancel(job)
            raise
        finally:
            gone.cancel()
        if result in done:
            return result.result()
        result.cancel()
        self.engine_thread.cancel(job)
        self.metrics.requests.labels("cancelled").inc()
        raise ClientGone

    def _chunk(self, request_id: str, created: int, choices: list[CompletionChoice],
               usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=request_id, created=created, model=self.model_id, choices=choices, usage=usage)

    async def _stream(self, plan: Plan, job: Job, request: Request, request_id: str, created: int,
                      include_usage: bool) -> StreamingResponse:
        """Wait for the first event (so that a failure before any text is still a 500), then stream."""
        first = await self._or_gone(request, job, job.events.get())
        if first[0] == "error":
            self.metrics.requests.labels("failed").inc()
            raise ApiError(500, _failed(first[1]))
        self.metrics.in_flight.inc()  # the response now owns the request until it closes
        outcome = ["cancelled"]  # what close() records, unless the events say otherwise

        def close() -> None:
            if not job.over:
                self.engine_thread.cancel(job)
            self.metrics.requests.labels(outcome[0]).inc()
            self.metrics.in_flight.dec()

        return EventStream(self._events(plan, job, first, request_id, created, include_usage, outcome), close)

    async def _events(self, plan: Plan, job: Job, event: tuple, request_id: str, created: int,
                      include_usage: bool, outcome: list[str]) -> AsyncIterator[str]:
        offsets = [OffsetCounter(self.tokenizer) for _ in plan.choices]
        started = [False] * len(plan.choices)
        while True:
            kind = event[0]
            if kind == "delta":
                _, index, text, logprobs, prompt_logprobs, finish_reason = event
                if plan.echo and not started[index]:
                    prompt_part = None
                    if plan.logprobs is not None:
                        prompt_part = api_logprobs(self.tokenizer, prompt_logprobs or [], offsets[index])
                    yield self._sse(request_id, created, index, plan.prompt_texts[index], prompt_part)
                started[index] = True
                if text or logprobs:
                    part = None if plan.logprobs is None else api_logprobs(self.tokenizer, logprobs or [], offsets[index])
                    yield self._sse(request_id, created, index, text, part)
                if finish_reason:
                    yield self._sse(request_id, created, index, "", None, finish_reason)
            elif kind == "done":
                outcome[0] = "completed"
                self.metrics.request_seconds.observe(time.perf_counter() - job.arrived)
                if include_usage:
                    completion_tokens = sum(len(s.token_ids) for s in job.sequences)
                    usage = Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=plan.prompt_tokens + completion_tokens)
                    yield sse(self._chunk(request_id, created, [], usage).model_dump())
                yield "data: [DONE]\n\n"
                return
            else:  # "error": the status line has gone out already, so the error travels as an event
                outcome[0] = "failed"
                yield sse(error_body(500, _failed(event[1])))
                return
            event = await job.events.get()

    def _sse(self, request_id: str, created: int, index: int, text: str, logprobs: CompletionLogprobs | None,
             finish_reason: str | None = None) -> str:
        choice = CompletionChoice(text=text, index=index, logprobs=logprobs, finish_reason=finish_reason)
        return sse(self._chunk(request_id, created, [choice]).model_dump())

    # -- tokenizer ------------------------------------------------------------------------------------

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse | VllmTokenizeResponse:
        self.check_model(body.model)
        if (body.text is None) == (body.prompt is None):
            raise ApiError(400, "send either text (gptlab's shape) or prompt (vLLM's)", param="text")
        name = "text" if body.text is not None else "prompt"
        try:
            ids = self.encode(body.text if body.text is not None else body.prompt)
        except GptlabError as exc:
            raise ApiError(400, f"{name}: {exc}", param=name) from None
        if body.prompt is not None:
            return VllmTokenizeResponse(count=len(ids), max_model_len=self.context, tokens=ids)
        return TokenizeResponse(ids=ids, tokens=[self.tokenizer.decode([i]) for i in ids], count=len(ids))

    def tokenizer_info(self) -> TokenizerInfo:
        eos = self.tokenizer.eos_id
        eos_text = None if eos is None else self.tokenizer.decode([eos])
        return TokenizerInfo(tokenizer_class=self.tokenizer.name, eos_token=eos_text, bos_token=eos_text,
                             model_max_length=self.context, vocab_size=self.tokenizer.vocab_size)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse | VllmDetokenizeResponse:
        self.check_model(body.model)
        if (body.ids is None) == (body.tokens is None):
            raise ApiError(400, "send either ids (gptlab's shape) or tokens (vLLM's)", param="ids")
        name = "ids" if body.ids is not None else "tokens"
        try:
            text = self.tokenizer.decode(body.ids if body.ids is not None else body.tokens)
        except GptlabError as exc:
            raise ApiError(400, f"{name}: {exc}", param=name) from None
        return DetokenizeResponse(text=text) if body.ids is not None else VllmDetokenizeResponse(prompt=text)


def _failed(exc: BaseException) -> str:
    """A 500's message: what failed, in one line (the log has the traceback)."""
    return f"generation failed inside the server ({failure_cause(exc)}); see its log"


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
