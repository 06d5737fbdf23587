"""The server's refusals in OpenAI's shape (logit_bias keys, n over the queue, foreign Host headers), a
request that breaks its batch failing alone beside good ones, and the server's start (batch size 1
measured before it listens, the rest while it waits)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from gptlab.kernels import chooser
from gptlab.checkpoint import load_model, save_model
from gptlab.config import GPTConfig
from gptlab.serve.limits import ServerLimits
from gptlab.model import GPT
from gptlab.serve import create_app, running_server
from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer
from test_server import TIMEOUT, HeldEngine, Served, serve_tiny_run, wait_for
from helpers import poison_forward

# -- the server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_run: Path):
    yield from serve_tiny_run(tiny_run)


@pytest.fixture(scope="module")
def gpt2_server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("gpt2-tiny-isolation")
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)), directory)
    GPT2Tokenizer().save(directory)
    app = create_app(load_model(directory), load_tokenizer(directory), "gpt2-tiny",
                     ServerLimits(max_choices=8, max_queue=4), allowed_hosts=["127.0.0.1", "localhost", "::1"])
    with running_server(app) as url:
        yield Served(url, "gpt2-tiny", load_tokenizer(directory), load_model(directory).eval(), app.state.service)


def held_together(served: Served, monkeypatch: pytest.MonkeyPatch, bodies: list[dict]) -> list[httpx.Response]:
    """Send the requests while the engine is held, so that they all join one batch, then release it."""
    held = HeldEngine(served.service)
    monkeypatch.setattr(served.service.engine, "step", held)
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        try:
            holder = pool.submit(served.post, prompt="All", max_tokens=2, temperature=0)
            assert held.entered.wait(60)
            futures = [pool.submit(served.post, **body) for body in bodies]
            wait_for(lambda: served.service.engine_thread.queued() >= len(bodies) + 1, "the requests to queue")
        finally:
            held.gate.set()
        assert holder.result().status_code == 200
        responses = [f.result() for f in futures]
    assert max(held.batches) >= len(bodies) + 1  # they shared a step
    return responses


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["!", ""])
def test_echo_logprobs_on_a_one_token_prompt_beside_others(gpt2_server: Served, monkeypatch, prompt: str) -> None:
    bodies = [dict(prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2),
              dict(prompt="Hello there", max_tokens=5, temperature=0),
              dict(prompt="A long request " * 3, max_tokens=8, temperature=0)]
    odd, *good = held_together(gpt2_server, monkeypatch, bodies)
    assert odd.status_code == 200, odd.text
    logprobs = odd.json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == 1 + 3
    for response, body in zip(good, bodies[1:]):
        assert response.status_code == 200, response.text
        expected = gpt2_server.expected(body["prompt"], max_new_tokens=body["max_tokens"], temperature=0)
        assert response.json()["choices"][0]["text"] == expected.text


def test_a_request_that_breaks_the_batch_fails_alone_with_its_cause(server: Served, monkeypatch) -> None:
    texts = {prompt: server.expected(prompt, max_new_tokens=6, temperature=0).text for prompt in ("All:\n", "Speak")}
    used = set(server.tokenizer.encode("".join(texts) + "".join(texts.values()) + "All"))
    poison = min(set(range(server.tokenizer.vocab_size)) - used)  # in no good request's window
    poison_forward(server.service.engine.model, monkeypatch, poison)
    bodies = [dict(prompt="All:\n", max_tokens=6, temperature=0),
              dict(prompt="All" + server.tokenizer.decode([poison]), max_tokens=6, temperature=0),
              dict(prompt="Speak", max_tokens=6, temperature=0, stream=True)]
    good, bad, streamed = held_together(server, monkeypatch, bodies)
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "server_error"
    assert "RuntimeError: injected: a poisoned row" in error["message"] and "second line" not in error["message"]
    for response, body in [(good, bodies[0]), (streamed, bodies[2])]:
        assert response.status_code == 200, response.text
        expected = texts[body["prompt"]]
        if body.get("stream"):
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        else:
            text = response.json()["choices"][0]["text"]
        assert text == expected


@pytest.mark.parametrize("key, says", [
    ("²", "ASCII digits"), ("٣", "ASCII digits"), ("-1", "ASCII digits"), (" 3", "ASCII digits"), ("", "ASCII digits"),
    ("50257", "outside the vocabulary"), ("9" * 5000, "outside the vocabulary"),
])
def test_logit_bias_keys_are_ascii_token_ids(gpt2_server: Served, key: str, says: str) -> None:
    response = gpt2_server.post(prompt="Hi", max_tokens=1, logit_bias={key: 5})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logit_bias" and says in error["message"] and error["type"] == "invalid_request_error"


def test_logit_bias_ascii_key_takes_effect(gpt2_server: Served) -> None:
    response = gpt2_server.post(prompt="Hi", max_tokens=3, temperature=0, logit_bias={"0050": 100})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "SSS"  # id 50 is "S"


def test_n_beyond_the_queue_is_400_not_429(gpt2_server: Served) -> None:
    response = gpt2_server.post(prompt="Hi", max_tokens=1, n=5)  # max_queue 4, max_choices 8
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "n" and "--max-queue" in error["message"] and error["type"] == "invalid_request_error"
    assert gpt2_server.post(prompt="Hi", max_tokens=1, n=4).status_code == 200


@pytest.mark.parametrize("host, status", [
    ("attacker.example", 400), ("attacker.example:80", 400), ("127.0.0.1.evil.example", 400), ("[::2]", 400),
    ("localhost", 200), ("LocalHost:8000", 200), ("127.0.0.1:1", 200), ("[::1]:8000", 200),
])
def test_host_header_check_answers_in_openais_shape(gpt2_server: Served, host: str, status: int) -> None:
    response = httpx.get(gpt2_server.url + "/v1/models", headers={"host": host}, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    if status != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_host" and repr(host) in error["message"]


def test_the_server_listens_after_batch_size_one_and_warms_the_rest_while_waiting(
        tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chooser, "_chosen", {})
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", "off")

    def measured_rows() -> set[int]:
        return {key[1] for key in list(chooser._chosen) if key[0] == "linear"}

    app = create_app(load_model(tiny_run), load_tokenizer(tiny_run), "tiny", ServerLimits(max_batch=16))
    assert measured_rows() == {1}  # before it listens: batch size 1 only
    with running_server(app) as url:
        health = httpx.get(url + "/health", timeout=TIMEOUT).json()
        assert health["status"] == "ok" and isinstance(health["warm"], bool)
        wait_for(lambda: httpx.get(url + "/health", timeout=TIMEOUT).json()["warm"], "the warm-up to finish")
        assert measured_rows() == {1, 2, 4, 8, 16}
        answer = httpx.post(url + "/v1/completions", json={"prompt": "All", "max_tokens": 3}, timeout=TIMEOUT)
        assert answer.status_code == 200
