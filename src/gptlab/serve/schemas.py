"""The request and response bodies of `gptlab serve`, in the shapes the OpenAI completions API uses.

Kept apart from the app and the service so the wire format can be read on its own: these classes are what the
automatic OpenAPI document shows. Requests are strict (a string is never silently turned into a
number, unknown fields are refused) so a client's mistake comes back as a 422 naming the field,
instead of a generation with settings the client did not ask for. Ranges are *not* checked here:
an out-of-range value is a well-typed request the server refuses with a 400 that says the range.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

PromptType = str | list[str] | list[int] | list[list[int]]


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = Field(False, description="send a last chunk, with no choices, that carries `usage`")


class CompletionRequest(BaseModel):
    """POST /v1/completions. `null` for an optional field means its default, as in OpenAI's API."""

    model_config = _STRICT

    model: str = Field(description="the id listed by GET /v1/models")
    prompt: PromptType = Field(
        description="the text to continue; a list of strings for several prompts; token ids "
                    "(a list of ints, or a list of such lists) are accepted too. An empty prompt "
                    "starts a new document."
    )
    max_tokens: int | None = Field(16, description="tokens to generate per choice, at most the server's limit")
    temperature: float | None = Field(1.0, description="softmax temperature, >= 0; 0 is greedy")
    top_p: float | None = Field(None, description="nucleus sampling mass, in (0, 1]")
    n: int | None = Field(1, description="choices per prompt, >= 1")
    stop: str | list[str] | None = Field(
        None, description="up to 4 non-empty strings; the text stops before the first one found"
    )
    seed: int | None = Field(
        None, description="makes sampling reproducible, 0 <= seed < 2**64; choice j of a prompt uses seed + j"
    )
    stream: bool | None = Field(False, description="send Server-Sent Events as tokens arrive")
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, description="gptlab: sample only among the k most likely tokens, >= 1")
    repetition_penalty: float | None = Field(
        None, description="gptlab: > 0; above 1 makes tokens already present less likely"
    )
    user: str | None = Field(None, description="accepted for compatibility, not used")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = Field(
        description="`stop`: a stop string or the end-of-text token; `length`: max_tokens reached. "
                    "null in a streamed chunk that is not a choice's last."
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens of the prompts, each prompt counted once")
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The body of a non-streamed completion, and of each streamed `data:` chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptlab"
    context_length: int = Field(description="gptlab: the most tokens the model attends to")
    max_tokens_limit: int = Field(description="gptlab: the largest max_tokens this server accepts")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ServerStats(BaseModel):
    """Counters since start-up, for operators and for tests that check what the server did."""

    requests_in_flight: int = 0
    completions: int = Field(0, description="completion requests answered in full")
    failures: int = Field(0, description="completion requests that failed with a server error")
    cancelled_streams: int = Field(0, description="streams stopped because the client went away")
    completion_tokens: int = Field(0, description="tokens generated, counting cancelled streams")
    batches: int = Field(0, description="batched generation calls made for non-streamed requests")
    batched_rows: int = Field(0, description="prompt rows those calls generated for")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    stats: ServerStats


class TokenizeRequest(BaseModel):
    model_config = _STRICT

    text: str


class TokenizeResponse(BaseModel):
    ids: list[int]
    tokens: list[str] = Field(description="each id decoded alone (a piece of a UTF-8 character shows as U+FFFD)")
    count: int


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    ids: list[int]


class DetokenizeResponse(BaseModel):
    text: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which its client libraries turn into exceptions carrying the message."""

    error: ErrorDetail
