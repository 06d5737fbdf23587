"""`/v1/chat/completions` on a real server on loopback, through the official `openai` client: the reply is
the model's continuation of the conversation's template ids (the same engine as completions), streamed
chunks add up to the whole reply, the turn ends at end-of-text, and refusals have OpenAI's shape."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from gptlab.chat import CHAT_TEMPLATE, ChatFormat, parse_messages
from gptlab.checkpoint import load_model, save_model
from gptlab.config import GPTConfig
from gptlab.inference import Completion, SamplingParams, complete
from gptlab.model import GPT
from gptlab.serve import create_app, running_server
from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer

pytestmark = pytest.mark.slow  # starts servers
openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You add."}, {"role": "user", "content": "What is 38 + 47?"}]


@dataclass
class ChatServer:
    url: str
    directory: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def expected(self, messages: list[dict], **params) -> Completion:
        """The reply computed without the server: the template's prompt ids, continued by the same weights."""
        tokenizer = load_tokenizer(self.directory)
        prompt = ChatFormat.of(tokenizer).prompt_ids(parse_messages(messages))
        return complete(load_model(self.directory).eval(), tokenizer, [prompt], SamplingParams(**params))[0]


def _serve(directory: Path, template: str | None) -> Iterator[ChatServer]:
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)), directory)
    tokenizer = GPT2Tokenizer()
    tokenizer.chat_template = template
    tokenizer.save(directory)
    app = create_app(load_model(directory), load_tokenizer(directory), "chat-tiny",
                     allowed_hosts=["127.0.0.1", "localhost"])
    with running_server(app) as url:
        yield ChatServer(url, directory)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatServer]:
    yield from _serve(tmp_path_factory.mktemp("chat-run"), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatServer]:
    yield from _serve(tmp_path_factory.mktemp("plain-run"), None)


def test_openai_client_chat_completion_is_the_models_reply_with_usage(chat_server: ChatServer) -> None:
    expected = chat_server.expected(MESSAGES, max_new_tokens=10, temperature=0)
    reply = chat_server.client().chat.completions.create(model="chat-tiny", messages=MESSAGES, max_tokens=10,
                                                         temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    prompt = ChatFormat(GPT2Tokenizer()).prompt_ids(parse_messages(MESSAGES))
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_streamed_deltas_add_up_to_the_whole_reply(chat_server: ChatServer) -> None:
    client = chat_server.client()
    whole = client.chat.completions.create(messages=MESSAGES, model="chat-tiny", max_completion_tokens=12,
                                           temperature=0)
    chunks = list(client.chat.completions.create(messages=MESSAGES, model="chat-tiny", max_completion_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


def test_the_reply_ends_at_the_end_of_the_turn(chat_server: ChatServer) -> None:
    """With end-of-text made certain after three tokens, the reply is those three, finish_reason stop."""
    reply = chat_server.client().chat.completions.create(
        model="chat-tiny", messages=MESSAGES, max_tokens=30, temperature=0, extra_body={"min_tokens": 3},
        logit_bias={"50256": 100})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 4  # three tokens and the end-of-text that closed the turn
    assert "<|endoftext|>" not in reply.choices[0].message.content


def test_n_seeded_choices_and_logprobs(chat_server: ChatServer) -> None:
    reply = chat_server.client().chat.completions.create(
        model="chat-tiny", messages=MESSAGES, max_tokens=5, n=3, seed=7, logprobs=True, top_logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        entries = choice.logprobs.content
        assert len(entries) == 5
        for entry in entries:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6  # none is likelier than the likeliest
        # the tokens' bytes spell the reply (a token may hold part of a UTF-8 character)
        assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == choice.message.content
    expected = chat_server.expected(MESSAGES, max_new_tokens=5, seed=8)
    assert reply.choices[1].message.content == expected.text  # choice j samples with seed + j


def test_a_model_without_a_chat_template_answers_400(plain_server: ChatServer) -> None:
    with pytest.raises(openai.BadRequestError, match="no chat template") as caught:
        plain_server.client().chat.completions.create(model="chat-tiny", messages=MESSAGES)
    assert caught.value.body["param"] == "messages"


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "a <|endoftext|> b"}], "must not contain"),
])
def test_bad_messages_are_400_in_openais_shape(chat_server: ChatServer, messages: list, fragment: str) -> None:
    response = httpx.post(chat_server.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error" and error["param"] == "messages"


def test_a_conversation_longer_than_the_context_is_400(chat_server: ChatServer) -> None:
    response = httpx.post(chat_server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "word " * 100}]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "the conversation is" in error["message"]
