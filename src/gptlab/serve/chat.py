"""`/v1/chat/completions`: a conversation through the model's chat template (gptlab.chat) becomes a prompt of
token ids, which the completions service checks, queues and generates like any other (the same engine
and batch); only the answer's shape differs (`message` and `delta` instead of `text`, OpenAI's chat
logprobs). The reply ends at the end-of-text token that closes the assistant's turn."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..chat import ChatFormat, parse_messages
from ..errors import GptlabError
from ..inference import TokenLogprobs
from ..tokenizers import Tokenizer
from .errors import ApiError, error_body
from .logprobs import FLOOR, token_text
from .schemas import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatMessageOut, CompletionRequest, TokenLogprob, TopLogprob,
)
from .service import CompletionService, Plan, failed, usage
from .streaming import sse


class ChatService:
    def __init__(self, service: CompletionService) -> None:
        self.service = service
        self.format: ChatFormat | None = None
        self.missing = ("this model has no chat template (no chat_template in its tokenizer_config.json); tune it "
                        "with `gptlab train --task chat`, or use /v1/completions")
        try:
            self.format = ChatFormat.of(service.tokenizer)
        except GptlabError as exc:
            self.missing = str(exc)

    async def plan(self, body: ChatCompletionRequest) -> Plan:
        """The completions plan of the conversation's prompt, with the chat request's sampling fields."""
        self.service.check_model(body.model)
        if self.format is None:
            raise ApiError(400, self.missing, param="messages")
        try:
            messages = parse_messages([m.model_dump() for m in body.messages])
        except GptlabError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt = await run_in_threadpool(self.format.prompt_ids, messages)
        if len(prompt) > self.service.context:  # named as the conversation, not as the prompt it becomes
            raise ApiError(400, f"the conversation is {len(prompt)} tokens with its template; this model accepts at "
                                f"most {self.service.context}", param="messages", code="context_length_exceeded")
        limit = self.service.limits.max_tokens
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # as vLLM: what is left of the context, within the server's limit
            max_tokens = max(1, min(limit, self.service.context - len(prompt)))
        fields = body.model_dump(exclude={"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                          "stream_options"})
        request = CompletionRequest(**fields | {"prompt": prompt, "max_tokens": max_tokens,
                                                "stream_options": body.stream_options,
                                                "logprobs": (body.top_logprobs or 0) if body.logprobs else None})
        return await self.service.plan(request)

    async def respond(self, body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | StreamingResponse:
        plan = await self.plan(body)
        service = self.service
        job = service.submit(plan, stream=bool(body.stream))
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        top = body.top_logprobs or 0
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices: list[ChatChunkChoice], **extra: Any) -> str:
                return sse(ChatCompletionChunk(id=request_id, created=created, model=service.model_id,
                                               choices=choices, **extra).model_dump(exclude_none=True))

            async def events(event: tuple, outcome: list[str]) -> AsyncIterator[str]:
                started = [False] * len(plan.choices)
                while True:
                    if event[0] == "delta":
                        _, index, text, logprobs, _, finish_reason = event
                        if not started[index]:
                            started[index] = True
                            yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
                        if text or logprobs:
                            part = self._logprobs(logprobs or [], top) if plan.logprobs is not None else None
                            yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=part)])
                        if finish_reason:
                            yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason)])
                    elif event[0] == "done":
                        service.finished(job, outcome)
                        if include_usage:
                            yield chunk([], usage=usage(plan.prompt_tokens, job.sequences))
                        yield "data: [DONE]\n\n"
                        return
                    else:  # the status line has gone out already, so the error travels as an event
                        outcome[0] = "failed"
                        yield sse(error_body(500, failed(event[1])))
                        return
                    event = await job.events.get()

            return await service.stream(job, request, events)
        results = await service.results(job, request)
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                              logprobs=self._logprobs(c.logprobs or [], top) if plan.logprobs is not None else None)
                   for i, c in enumerate(results)]
        return ChatCompletionResponse(id=request_id, created=created, model=service.model_id, choices=choices,
                                      usage=usage(plan.prompt_tokens, results))

    def _logprobs(self, entries: list[TokenLogprobs], top: int) -> ChatLogprobs:
        """OpenAI's chat logprobs: each token with its bytes and the `top` most likely at its position."""
        tokenizer = self.service.tokenizer
        return ChatLogprobs(content=[
            TokenLogprob(**_entry(tokenizer, e.token, e.logprob), top_logprobs=[
                TopLogprob(**_entry(tokenizer, t, v))
                for t, v in sorted(e.top.items(), key=lambda kv: -kv[1])[:top]])
            for e in entries])


def _entry(tokenizer: Tokenizer, token: int, logprob: float | None) -> dict[str, Any]:
    return {"token": token_text(tokenizer, token), "logprob": max(logprob if logprob is not None else FLOOR, FLOOR),
            "bytes": list(tokenizer.decode_bytes([token]))}
