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

    model: str | None = Field(None, description="the id listed by GET /v1/models; null: the served model")
    prompt: PromptType = Field(
        description="the text to continue; a list of strings for several prompts; token ids "
                    "(a list of ints, or a list of such lists) are accepted too. An empty prompt "
                    "starts a new document. `<|endoftext|>` in a string is the end-of-text token (id 50256 "
                    "for GPT-2), as in OpenAI's and Hugging Face's tokenizers."
    )
    max_tokens: int | None = Field(16, description="tokens to generate per choice, at most the server's limit; "
                                                   "0 with `echo` scores the prompt only")
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
    logprobs: int | None = Field(
        None, description="per token: its log-probability under the model and the N most likely tokens "
                          "(0 <= N <= 20), in `choices[].logprobs`")
    echo: bool | None = Field(False, description="put the prompt before the completion (with `logprobs`: the "
                                                 "prompt's tokens and their log-probabilities too)")
    presence_penalty: float | None = Field(0.0, description="in [-2, 2]; subtracted once from the logit of "
                                                            "every token generated so far")
    frequency_penalty: float | None = Field(0.0, description="in [-2, 2]; subtracted from a token's logit once "
                                                             "per time it was generated")
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string, as OpenAI's) -> a bias in [-100, 100] added to its logit")
    user: str | None = Field(None, description="accepted for compatibility, not used")
    top_k: int | None = Field(None, description="vLLM/gptlab: sample only among the k most likely tokens, >= 1")
    repetition_penalty: float | None = Field(
        None, description="vLLM/gptlab: > 0; above 1 makes tokens already present (prompt and output) less likely"
    )
    min_tokens: int | None = Field(0, description="vLLM: end-of-text and `stop_token_ids` cannot end a choice "
                                                  "before this many tokens (<= max_tokens)")
    stop_token_ids: list[int] | None = Field(None, description="vLLM: more token ids that end a choice "
                                                               "like end-of-text (left out of the text)")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: one entry per token of the choice's text (prompt first with echo)."""

    tokens: list[str] = Field(description="each token as text; one that is not whole UTF-8 as `bytes:\\xNN...`")
    token_logprobs: list[float | None] = Field(description="log-probability under the model, before sampling "
                                                           "controls; null for the prompt's first token")
    top_logprobs: list[dict[str, float] | None] = Field(description="the N most likely tokens at each position, "
                                                                    "and the chosen one")
    text_offset: list[int] = Field(description="where each token's text starts in the choice's text")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = Field(
        description="`stop`: a stop string, a stop token or the end-of-text token; `length`: max_tokens reached. "
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
    """Counters since start-up (the same as /metrics), for operators and tests that check what the server did."""

    requests_in_flight: int = 0
    completions: int = Field(0, description="completion requests answered in full")
    failures: int = Field(0, description="completion requests that failed with a server error")
    cancelled: int = Field(0, description="requests stopped because their client went away, streamed or not")
    rejected: int = Field(0, description="requests refused with 429 because the queue was full")
    completion_tokens: int = Field(0, description="tokens generated, counting cancelled requests")
    steps: int = Field(0, description="batched forward steps of the engine")
    running: int = Field(0, description="sequences in the batch now")
    queued: int = Field(0, description="sequences waiting for a place in the batch now")


class Health(BaseModel):
    """The server answers this as soon as it can serve: batch size 1's kernels are measured before it
    listens, the other batch sizes' while it waits for requests (`warm` says when that is done)."""

    status: Literal["ok"] = "ok"
    model: str
    warm: bool = Field(description="gptlab: every batch size's kernels are measured; until then a request may "
                                   "wait for one measurement (a fraction of a second)")
    stats: ServerStats


class TokenizeRequest(BaseModel):
    """Ours: `{"text"}`; vLLM's: `{"prompt", "model"?, "add_special_tokens"?}`, answered in vLLM's shape."""

    model_config = _STRICT

    text: str | None = None
    prompt: str | None = Field(None, description="vLLM's name for `text`")
    model: str | None = None
    add_special_tokens: bool | None = Field(None, description="vLLM's; GPT-2 adds no special tokens either way")


class TokenizeResponse(BaseModel):
    ids: list[int]
    tokens: list[str] = Field(description="each id decoded alone (a piece of a UTF-8 character shows as U+FFFD)")
    count: int


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """Ours: `{"ids"}`; vLLM's: `{"tokens", "model"?}`, answered `{"prompt"}` as vLLM does."""

    model_config = _STRICT

    ids: list[int] | None = None
    tokens: list[int] | None = Field(None, description="vLLM's name for `ids`")
    model: str | None = None


class DetokenizeResponse(BaseModel):
    text: str


class VllmDetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM's GET /tokenizer_info, which lm-eval's remote tokenizer reads (then it calls /tokenize)."""

    tokenizer_class: str = Field(description="gptlab's tokenizer name: gpt2 (byte-level BPE) or char")
    eos_token: str | None = Field(description="the end-of-text token's text, null when the vocabulary has none")
    bos_token: str | None = Field(description="GPT-2 starts documents with its end-of-text token")
    pad_token: str | None = None
    model_max_length: int
    vocab_size: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which its client libraries turn into exceptions carrying the message."""

    error: ErrorDetail


# --- /v1/chat/completions ------------------------------------------------------------------------


class ChatMessageIn(BaseModel):
    """One message of the conversation; its role is checked by the service (a 400 naming it)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)  # clients send name, tool fields

    role: str
    content: str | list[dict[str, object]] | None = Field(
        description="the text, or OpenAI's list of `{type: text, text}` parts")


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: the completions request's sampling fields, with `messages` for `prompt`."""

    model_config = _STRICT

    model: str | None = Field(None, description="the id listed by GET /v1/models; null: the served model")
    messages: list[ChatMessageIn] = Field(description="the conversation: system, user and assistant messages")
    max_tokens: int | None = Field(None, description="deprecated name of max_completion_tokens")
    max_completion_tokens: int | None = Field(
        None, description="tokens to generate per choice; null: as many as the context and the server's limit allow")
    temperature: float | None = Field(1.0, description="softmax temperature, >= 0; 0 is greedy")
    top_p: float | None = Field(None, description="nucleus sampling mass, in (0, 1]")
    n: int | None = Field(1, description="choices, >= 1")
    stop: str | list[str] | None = Field(None, description="up to 4 non-empty strings; the reply stops before one")
    seed: int | None = Field(None, description="makes sampling reproducible; choice j uses seed + j")
    stream: bool | None = Field(False, description="send Server-Sent Events (`delta` chunks) as tokens arrive")
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(False, description="return each reply token's log-probability")
    top_logprobs: int | None = Field(None, description="with logprobs: the N most likely tokens at each position, "
                                                       "0 <= N <= 20")
    presence_penalty: float | None = Field(0.0, description="in [-2, 2]")
    frequency_penalty: float | None = Field(0.0, description="in [-2, 2]")
    logit_bias: dict[str, float] | None = Field(None, description="token id (a string) -> bias in [-100, 100]")
    user: str | None = Field(None, description="accepted for compatibility, not used")
    top_k: int | None = Field(None, description="vLLM/gptlab: sample only among the k most likely tokens")
    repetition_penalty: float | None = Field(None, description="vLLM/gptlab: > 0")
    min_tokens: int | None = Field(0, description="vLLM: the end of the turn cannot come before this many tokens")
    stop_token_ids: list[int] | None = Field(None, description="vLLM: more token ids that end a reply")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed `data:` event: a piece of one choice's reply (or, last, only `usage`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
