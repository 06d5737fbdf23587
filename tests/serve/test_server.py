"""`gptlab serve` against a real uvicorn server on a free loopback port: httpx for every endpoint and
every refusal, the official `openai` client, continuous batching, logprobs against transformers,
disconnects, the bounded queue, injected failures, and load."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from gptlab.checkpoint import load_model, save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.inference import Completion, SamplingParams, complete
from gptlab.inference.engine import Sequence
from gptlab.model import GPT
from gptlab.serve import create_app, running_server
from gptlab.serve.limits import ServerLimits
from gptlab.serve.service import CompletionService
from gptlab.tokenizers import GPT2Tokenizer, Tokenizer, load_tokenizer

# tiny_run's context is 32 tokens; max_tokens may go far beyond it (the window slides), which the
# disconnect tests need: a generation long enough that only a cancellation can end it early.
LIMITS = ServerLimits(max_tokens=5000, max_body_bytes=16_384, max_choices=8, max_batch=16)
TIMEOUT = httpx.Timeout(120.0)


@dataclass
class Served:
    url: str
    model_id: str
    tokenizer: Tokenizer
    reference: GPT  # a second copy of the served weights, to compute expected texts without the server
    service: CompletionService  # the server runs in this process: tests may look inside

    def post(self, path: str = "/v1/completions", **body) -> httpx.Response:
        if path == "/v1/completions":
            body.setdefault("model", self.model_id)
        return httpx.post(self.url + path, json=body, timeout=TIMEOUT)

    def expected(self, prompt: str, **params) -> Completion:
        return complete(self.reference, self.tokenizer, [self.tokenizer.encode(prompt)], SamplingParams(**params))[0]

    def stats(self) -> dict:
        return httpx.get(self.url + "/health", timeout=TIMEOUT).json()["stats"]


def serve_tiny_run(tiny_run: Path, limits: ServerLimits = LIMITS) -> Iterator[Served]:
    app = create_app(load_model(tiny_run), load_tokenizer(tiny_run), "tiny", limits,
                     allowed_hosts=["127.0.0.1", "localhost"])
    with running_server(app) as url:
        yield Served(url, "tiny", load_tokenizer(tiny_run), load_model(tiny_run).eval(), app.state.service)


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> Iterator[Served]:
    yield from serve_tiny_run(tiny_run)


@pytest.fixture(scope="module")
def gpt2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A random GPT with GPT-2's vocabulary, saved and loaded back like a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("gpt2-tiny")
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)), directory)
    GPT2Tokenizer().save(directory)
    app = create_app(load_model(directory), load_tokenizer(directory), "gpt2-tiny")
    with running_server(app) as url:
        yield Served(url, "gpt2-tiny", load_tokenizer(directory), load_model(directory).eval(), app.state.service)


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    """Poll a condition the server reaches asynchronously; the deadline only bounds a broken run."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an event stream, checking that nothing else is in it."""
    payloads = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            payloads.append(line[len("data: "):])
    return payloads


def streamed_texts(payloads: list[str], choices: int) -> tuple[list[str], list]:
    texts, reasons = [""] * choices, [None] * choices
    for chunk in map(json.loads, payloads[:-1]):
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    return texts, reasons


class HeldEngine:
    """Wraps the server's engine step: the first step waits until the test releases it, and every
    step's batch size is recorded. Test-only: installed with monkeypatch."""

    def __init__(self, service: CompletionService) -> None:
        self.step = service.engine.step
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __call__(self):
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(timeout=120), "the test never released the gate"
        rows = self.step()
        self.batches.append(len(rows))
        return rows


def fail_sequences(monkeypatch: pytest.MonkeyPatch, prompt: list[int], after: int) -> None:
    """Make every sequence with this prompt fail when it takes its token number `after` + 1."""
    add = Sequence.add

    def failing(self: Sequence, token: int, logprobs) -> None:
        if self.prompt == prompt and len(self.token_ids) >= after:
            raise RuntimeError("injected failure")
        add(self, token, logprobs)

    monkeypatch.setattr(Sequence, "add", failing)


# -- completions ----------------------------------------------------------------------------------

def test_completion_is_the_models_text_with_usage(server: Served) -> None:
    response = server.post(prompt="First Citizen:\n", max_tokens=20, temperature=0)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = server.expected("First Citizen:\n", max_new_tokens=20, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"text": expected.text, "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 15, "completion_tokens": 20, "total_tokens": 35}


def test_several_prompts_and_seeded_choices(server: Served) -> None:
    request = dict(prompt=["All:\n", "Speak"], n=2, max_tokens=12, temperature=1.0, top_k=20, top_p=0.9,
                   repetition_penalty=1.2, seed=7)
    first, again = server.post(**request).json(), server.post(**request).json()
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert texts == [c["text"] for c in again["choices"]]
    for i, prompt in enumerate(["All:\n", "Speak"]):
        for j in range(2):  # choice j of a prompt samples with seed + j
            expected = server.expected(prompt, max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9,
                                       repetition_penalty=1.2, seed=7 + j)
            assert texts[2 * i + j] == expected.text
    assert texts[0] != texts[1]
    assert first["usage"]["prompt_tokens"] == len("All:\n") + len("Speak")


def test_token_id_prompts_equal_text_prompts(server: Served) -> None:
    ids = server.tokenizer.encode("Speak, speak.")
    by_text = server.post(prompt="Speak, speak.", max_tokens=8, temperature=0).json()["choices"]
    by_ids = server.post(prompt=ids, max_tokens=8, temperature=0).json()["choices"]
    by_lists = server.post(prompt=[ids, ids], max_tokens=8, temperature=0).json()["choices"]
    assert by_ids == by_text
    assert [c["text"] for c in by_lists] == [by_text[0]["text"]] * 2


def test_stop_string_ends_the_choice_before_it(server: Served) -> None:
    full = server.post(prompt="First", max_tokens=40, temperature=0).json()["choices"][0]["text"]
    stop = full[10:13]
    cut = server.post(prompt="First", max_tokens=40, temperature=0, stop=[stop, "QQ"]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[:full.index(stop)]
    single = server.post(prompt="First", max_tokens=40, temperature=0, stop=stop).json()["choices"][0]
    assert single == cut


def test_empty_prompt_starts_a_document(gpt2_server: Served) -> None:
    response = gpt2_server.post(prompt="", max_tokens=5, temperature=0)
    assert response.status_code == 200, response.text
    expected = complete(gpt2_server.reference, gpt2_server.tokenizer, [[50256]],
                        SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert response.json()["choices"][0]["text"] == expected.text
    assert response.json()["usage"]["prompt_tokens"] == 1


# -- streaming ------------------------------------------------------------------------------------

def test_stream_sends_openai_chunks_then_done(server: Served) -> None:
    request = dict(model="tiny", prompt="First Citizen:\n", max_tokens=20, temperature=0, stream=True,
                   stream_options={"include_usage": True})
    with httpx.stream("POST", server.url + "/v1/completions", json=request, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_data(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" and c["model"] == "tiny" for c in chunks)
    choices = [choice for c in chunks for choice in c["choices"]]
    expected = server.expected("First Citizen:\n", max_new_tokens=20, temperature=0)
    assert "".join(c["text"] for c in choices) == expected.text
    assert len(choices) > 3  # the text came in pieces, not at the end
    assert [c for c in choices if c["finish_reason"]] == [
        {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 15, "completion_tokens": 20, "total_tokens": 35}


def test_streamed_choices_equal_unstreamed_ones(server: Served) -> None:
    request = dict(prompt=["All:\n", "Speak"], n=2, max_tokens=10, temperature=0.9, seed=3)
    unstreamed = [c["text"] for c in server.post(**request).json()["choices"]]
    with httpx.stream("POST", server.url + "/v1/completions", json=dict(request, model="tiny", stream=True),
                      timeout=TIMEOUT) as response:
        payloads = sse_data(response)
    texts = [""] * 4
    reasons = [None] * 4
    for chunk in map(json.loads, payloads[:-1]):
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert texts == unstreamed
    assert reasons == ["length"] * 4


def test_client_disconnect_stops_generation(server: Served) -> None:
    before = server.stats()
    request = dict(model="tiny", prompt="All:\n", max_tokens=5000, temperature=1.0, stream=True)
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("POST", server.url + "/v1/completions", json=request) as response:
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data: ")
                if received == 3:
                    break  # leaving the block without reading on closes the connection
    wait_for(lambda: server.stats()["cancelled"] == before["cancelled"] + 1, "the cancellation")
    wait_for(lambda: server.stats()["requests_in_flight"] == 0, "the request to end")
    generated = server.stats()["completion_tokens"] - before["completion_tokens"]
    assert 3 <= generated < 5000
    assert server.stats()["completion_tokens"] - before["completion_tokens"] == generated  # and it stays stopped


# -- the other endpoints --------------------------------------------------------------------------

def test_models_health_and_openapi(server: Served) -> None:
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["context_length"], m["max_tokens_limit"]) for m in models["data"]] == [
        ("tiny", "model", 32, 5000)]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/models", "/health", "/tokenize", "/detokenize"} <= set(spec["paths"])
    request_fields = set(spec["components"]["schemas"]["CompletionRequest"]["properties"])
    assert {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs",
            "echo", "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "repetition_penalty",
            "min_tokens", "stop_token_ids"} <= request_fields
    assert {"400", "404", "405", "413", "422", "429", "500"} <= set(spec["paths"]["/v1/completions"]["post"]["responses"])
    assert "/metrics" in spec["paths"]


def test_tokenize_and_back(server: Served, gpt2_server: Served) -> None:
    for served, text in [(server, "Speak, speak."), (gpt2_server, "naïve café, 東京 🚀")]:
        tokens = served.post("/tokenize", text=text).json()
        assert tokens["ids"] == served.tokenizer.encode(text) and tokens["count"] == len(tokens["ids"])
        assert served.post("/detokenize", ids=tokens["ids"]).json() == {"text": text}
    assert gpt2_server.post("/tokenize", text=" hello").json()["tokens"] == [" hello"]
    unknown = server.post("/tokenize", text="Speak €")
    assert unknown.status_code == 400 and "'€'" in unknown.json()["error"]["message"]
    outside = gpt2_server.post("/detokenize", ids=[50257])
    assert outside.status_code == 400 and "50257" in outside.json()["error"]["message"]


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param, says", [
    ({"prompt": None}, 422, "prompt", "Field required"),
    ({"max_tokens": "5"}, 422, "max_tokens", "valid integer"),
    ({"temperature": "hot"}, 422, "temperature", "valid number"),
    ({"stream": "yes"}, 422, "stream", "valid boolean"),
    ({"n": 1.5}, 422, "n", "valid integer"),
    ({"stop": ["a", 3]}, 422, "stop", "valid"),
    ({"logprobs": "5"}, 422, "logprobs", "valid integer"),
    ({"best_of": 2}, 422, "best_of", "not permitted"),
    ({"logprobs": 21}, 400, "logprobs", "[0, 20]"),
    ({"presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -3.0}, 400, "frequency_penalty", "[-2, 2]"),
    ({"logit_bias": {"x": 1.0}}, 400, "logit_bias", "token ids"),
    ({"logit_bias": {"3": 101.0}}, 400, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"999": 1.0}}, 400, "logit_bias", "outside the vocabulary"),
    ({"min_tokens": 5}, 400, "min_tokens", "max_tokens=4"),
    ({"stop_token_ids": [-1]}, 400, "stop_token_ids", "integers >= 0"),
    ({"max_tokens": 5001}, 400, "max_tokens", "at most 5000"),
    ({"max_tokens": -1}, 400, "max_tokens", "at least 0"),
    ({"temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"top_k": 0}, 400, "top_k", ">= 1"),
    ({"repetition_penalty": 0.0}, 400, "repetition_penalty", "> 0"),
    ({"seed": -1}, 400, "seed", "2**64"),
    ({"n": 0}, 400, "n", "at least 1"),
    ({"prompt": ["All"] * 3, "n": 3}, 400, "n", "limit is 8"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"stop": ""}, 400, "stop", "non-empty"),
    ({"prompt": "A" * 33}, 400, "prompt", "at most 32"),
    ({"prompt": []}, 400, "prompt", "empty list"),
    ({"prompt": [0, 999]}, 400, "prompt", "999"),
    ({"prompt": "Speak €"}, 400, "prompt", "'€'"),
    ({"model": "gpt-3.5-turbo-instruct"}, 404, "model", "'tiny'"),
])
def test_bad_request_is_refused_naming_the_field(server: Served, body: dict, status: int, param: str,
                                                  says: str) -> None:
    request = {"model": "tiny", "prompt": "All", "max_tokens": 4, **body}
    if body.get("prompt", "") is None:
        del request["prompt"]
    response = httpx.post(server.url + "/v1/completions", json=request, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert error["message"].startswith(param) or status != 422


def test_invalid_json_is_422(server: Served) -> None:
    response = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]["message"]


def test_body_over_the_limit_is_413_by_header_and_by_size(server: Served) -> None:
    big = json.dumps({"model": "tiny", "prompt": "A" * 20_000}).encode()
    declared = httpx.post(server.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert "16384 bytes" in declared.json()["error"]["message"]

    def chunks(body: bytes) -> Iterator[bytes]:  # no Content-Length: the size is only known by counting
        yield from (body[i:i + 1000] for i in range(0, len(body), 1000))

    undeclared = httpx.post(server.url + "/v1/completions", content=chunks(big),
                            headers={"content-type": "application/json"})
    assert undeclared.request.headers.get("transfer-encoding") == "chunked"
    assert undeclared.status_code == 413
    small = json.dumps({"model": "tiny", "prompt": "All", "max_tokens": 2}).encode()
    fine = httpx.post(server.url + "/v1/completions", content=chunks(small), headers={"content-type": "application/json"})
    assert fine.status_code == 200, fine.text


def test_foreign_host_header_is_refused(server: Served) -> None:
    """A web page that rebinds its own DNS name to 127.0.0.1 still sends its own name as Host."""
    response = httpx.get(server.url + "/v1/models", headers={"host": "attacker.example"})
    assert response.status_code == 400


_opened: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None:
        _opened.append(str(args[0]))


def test_requests_never_touch_the_files_they_name(server: Served, tiny_run: Path, tmp_path: Path) -> None:
    global _opened
    if _record_opens not in getattr(sys, "_gptlab_audit_hooks", []):
        sys.addaudithook(_record_opens)  # audit hooks cannot be removed; this one records only when asked
        sys._gptlab_audit_hooks = [_record_opens]  # type: ignore[attr-defined]
    secret, target = tmp_path / "secret.txt", tmp_path / "written.txt"
    secret.write_text("All")
    _opened = []
    try:
        responses = [
            server.post(model=str(tiny_run), prompt="All"),
            server.post(model=str(secret), prompt="All"),
            server.post(prompt=str(secret), max_tokens=2),
            server.post(prompt="All", max_tokens=2, stop=[str(target)], user=str(target)),
            server.post("/tokenize", text=str(secret)),
            httpx.get(server.url + "/v1/models", params={"path": str(secret)}),
        ]
        opened = list(_opened)
    finally:
        _opened = None
    assert [r.status_code for r in responses[:2]] == [404, 404]
    assert not [path for path in opened if str(tmp_path) in path or str(tiny_run) in path]
    assert not target.exists()


# -- failures, concurrency, batching --------------------------------------------------------------

def test_a_failing_request_is_500_and_the_server_keeps_serving(server: Served, monkeypatch) -> None:
    fail_sequences(monkeypatch, server.tokenizer.encode("Resolved."), after=0)
    before = server.stats()
    failed = server.post(prompt="Resolved.", max_tokens=4)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert server.post(prompt="All", max_tokens=4).status_code == 200
    assert server.stats()["failures"] == before["failures"] + 1


def test_a_failing_request_does_not_fail_its_batch(server: Served, monkeypatch) -> None:
    held = HeldEngine(server.service)
    monkeypatch.setattr(server.service.engine, "step", held)
    fail_sequences(monkeypatch, server.tokenizer.encode("Resolved."), after=2)
    with ThreadPoolExecutor(3) as pool:
        try:
            holder = pool.submit(server.post, prompt="Speak", max_tokens=4, temperature=0)
            assert held.entered.wait(60)
            bad = pool.submit(server.post, prompt="Resolved.", max_tokens=4, temperature=0)
            good = pool.submit(server.post, prompt="All:\n", max_tokens=4, temperature=0)
            wait_for(lambda: server.service.engine_thread.queued() == 3, "both requests to queue (and the holder)")
        finally:
            held.gate.set()
        assert holder.result().status_code == 200
        assert bad.result().status_code == 500
        assert good.result().status_code == 200
    assert held.batches[1] == 3  # after the holder's first step the three ran in one batch; only the bad one failed
    assert good.result().json()["choices"][0]["text"] == server.expected("All:\n", max_new_tokens=4,
                                                                         temperature=0).text


def test_a_stream_that_fails_midway_ends_with_an_error_event(server: Served, monkeypatch) -> None:
    fail_sequences(monkeypatch, server.tokenizer.encode("All"), after=3)
    request = dict(model="tiny", prompt="All", max_tokens=20, stream=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=request, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        payloads = sse_data(response)
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["error"]["type"] == "server_error"
    assert json.loads(payloads[0])["choices"][0]["text"]  # text went out before the failure

    fail_sequences(monkeypatch, server.tokenizer.encode("All"), after=0)
    early = server.post(prompt="All", max_tokens=20, stream=True)
    assert early.status_code == 500 and early.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert server.post(prompt="All", max_tokens=5, stream=True).status_code == 200


def test_generation_never_blocks_the_event_loop(server: Served, monkeypatch) -> None:
    held = HeldEngine(server.service)
    monkeypatch.setattr(server.service.engine, "step", held)
    with ThreadPoolExecutor(1) as pool:
        try:
            pending = pool.submit(server.post, prompt="All", max_tokens=4)
            assert held.entered.wait(60)
            # the model is busy (held inside a step), and the server still answers
            assert server.stats()["requests_in_flight"] == 1
            assert httpx.get(server.url + "/v1/models").status_code == 200
            assert server.post("/tokenize", text="All").json()["count"] == 3
            assert httpx.get(server.url + "/").status_code == 200
            assert httpx.get(server.url + "/metrics").status_code == 200
            assert not pending.done()
        finally:
            held.gate.set()
        assert pending.result().status_code == 200


def test_every_request_shares_the_engine_steps_and_gets_its_own_text(server: Served, monkeypatch) -> None:
    """Streamed and not, greedy and sampled, each seed its own: all advance in the same batched steps."""
    held = HeldEngine(server.service)
    monkeypatch.setattr(server.service.engine, "step", held)
    requests = [dict(prompt=p, max_tokens=6 + i, temperature=[0.0, 0.7, 1.3][i % 3], seed=i, top_k=[None, 10][i % 2],
                     stream=bool(i % 2)) for i, p in enumerate(["All:\n", "Speak", "First", "Resolved.", "You"])]

    def send(request: dict) -> str:
        if not request["stream"]:
            return server.post(**request).json()["choices"][0]["text"]
        with httpx.stream("POST", server.url + "/v1/completions", json=dict(request, model="tiny"),
                          timeout=TIMEOUT) as response:
            return streamed_texts(sse_data(response), 1)[0][0]

    with ThreadPoolExecutor(len(requests) + 1) as pool:
        try:
            holder = pool.submit(server.post, prompt="Speak", max_tokens=20, temperature=0)
            assert held.entered.wait(60)
            futures = [pool.submit(send, r) for r in requests]
            # the held step has not admitted the holder yet: it waits with them
            wait_for(lambda: server.service.engine_thread.queued() == len(requests) + 1, "the requests to queue")
        finally:
            held.gate.set()
        answers = [f.result() for f in futures]
        assert holder.result().status_code == 200
    assert held.batches[1] == len(requests) + 1  # the step after the gate: every request at once
    assert answers == [server.expected(r["prompt"], max_new_tokens=r["max_tokens"], temperature=r["temperature"],
                                       seed=r["seed"], top_k=r["top_k"]).text for r in requests]


def test_concurrent_requests_are_all_answered(server: Served) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> str:
        request = dict(model="tiny", prompt="All:\n", max_tokens=10, temperature=0.8, seed=i)
        if i % 2:
            async with client.stream("POST", "/v1/completions", json=dict(request, stream=True)) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
        response = await client.post("/v1/completions", json=request)
        assert response.status_code == 200
        return response.json()["choices"][0]["text"]

    async def all_of_them() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    texts = asyncio.run(all_of_them())
    assert texts == [server.expected("All:\n", max_new_tokens=10, temperature=0.8, seed=i).text for i in range(8)]


def test_load_32_concurrent_requests(server: Served, capsys: pytest.CaptureFixture) -> None:
    """Bounded load: 32 requests at once, all must succeed; latency is reported, not asserted
    (benchmarks/serve_load.py measures it under the benchmark lock)."""
    prompts = [TEXT[i:i + 5 + i % 20] for i in range(32)]

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = await client.post("/v1/completions", json=dict(model="tiny", prompt=prompt, max_tokens=16))
        return response, time.perf_counter() - started

    async def all_of_them() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert [r.status_code for r, _ in results] == [200] * 32
    for response, _ in results:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length" and response.json()["usage"]["completion_tokens"] == 16
    cuts = statistics.quantiles([seconds for _, seconds in results], n=100, method="inclusive")
    with capsys.disabled():
        print(f"\n[serve load] 32 concurrent completions of 16 tokens: p50 {cuts[49] * 1000:.0f} ms, "
              f"p95 {cuts[94] * 1000:.0f} ms")


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


# -- clients that leave, a full queue -------------------------------------------------------------

@pytest.mark.slow
def test_a_non_streamed_request_whose_client_left_stops_generating(server: Served) -> None:
    before = server.stats()
    request = dict(model="tiny", prompt="All:\n", max_tokens=5000, temperature=1.0)
    for _ in range(3):  # three clients give up waiting: each closes its connection
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=request, timeout=httpx.Timeout(60.0, read=0.5))
    wait_for(lambda: server.stats()["cancelled"] == before["cancelled"] + 3, "the cancellations")
    wait_for(lambda: server.stats()["running"] == 0, "the batch to empty")
    generated = server.stats()["completion_tokens"] - before["completion_tokens"]
    assert generated < 3 * 5000
    quick = server.post(prompt="All", max_tokens=2)  # a new request is not stuck behind them
    assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 2
    assert server.stats()["completion_tokens"] - before["completion_tokens"] == generated + 2


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(tiny_run: Path) -> None:
    for served in serve_tiny_run(tiny_run, ServerLimits(max_tokens=5000, max_batch=1, max_queue=2)):
        stream = dict(model="tiny", prompt="All", max_tokens=5000, stream=True)
        with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", served.url + "/v1/completions",
                                                                   json=stream) as running:
            assert running.status_code == 200  # it holds the only place in the batch
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(served.post, prompt=["All", "Speak"], max_tokens=3)  # 2 sequences wait
                wait_for(lambda: served.service.engine_thread.queued() == 2, "the queue to fill")
                refused = served.post(prompt="All", max_tokens=3)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
                assert "--max-queue" in error["message"]
                metrics = httpx.get(served.url + "/metrics").text
                assert 'gptlab_requests_total{outcome="rejected"} 1.0' in metrics
                assert "gptlab_queue_length 2.0" in metrics
        assert waiting.result().status_code == 200  # once the stream closed, the waiting ones ran
        assert served.stats()["rejected"] == 1


# -- logprobs, echo, the tools' API ---------------------------------------------------------------

def test_logprobs_and_echo_have_openais_shape(gpt2_server: Served) -> None:
    prompt = "Hello world, naïve"
    ids = gpt2_server.tokenizer.encode(prompt)
    body = gpt2_server.post(prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True).json()
    choice = body["choices"][0]
    expected = complete(gpt2_server.reference, gpt2_server.tokenizer, [ids],
                        SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert choice["text"] == prompt + expected.text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 5
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][:len(ids)]) == prompt
    assert [choice["text"][at:at + len(tok)] for at, tok in zip(lp["text_offset"], lp["tokens"])][:len(ids)] == \
        lp["tokens"][:len(ids)]
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) in (2, 3) and top[token] == logprob  # the 2 most likely, and the chosen one
    greedy = lp["token_logprobs"][len(ids):]
    assert greedy == [max(top.values()) for top in lp["top_logprobs"][len(ids):]]  # greedy took the argmax

    scored = gpt2_server.post(prompt=ids, max_tokens=0, logprobs=1, echo=True).json()
    assert scored["choices"][0]["text"] == prompt and scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:len(ids)]
    plain = gpt2_server.post(prompt=prompt, max_tokens=3, temperature=0, logprobs=0).json()["choices"][0]
    assert plain["text"] == expected.text[:len(plain["text"])] and len(plain["logprobs"]["tokens"]) == 3
    assert plain["logprobs"]["text_offset"][0] == 0


def test_streamed_logprobs_and_echo_add_up_to_the_unstreamed_ones(gpt2_server: Served) -> None:
    request = dict(prompt="The cat sat", max_tokens=6, temperature=0.9, seed=4, logprobs=1, echo=True)
    whole = gpt2_server.post(**request).json()["choices"][0]
    with httpx.stream("POST", gpt2_server.url + "/v1/completions", json=dict(request, model="gpt2-tiny", stream=True),
                      timeout=TIMEOUT) as response:
        chunks = [json.loads(p) for p in sse_data(response)[:-1]]
    parts = [c["choices"][0] for c in chunks]
    assert "".join(p["text"] for p in parts) == whole["text"]
    merged = {key: [v for p in parts if p["logprobs"] for v in p["logprobs"][key]] for key in whole["logprobs"]}
    assert merged == whole["logprobs"]


def test_token_logprobs_equal_transformers_log_softmax(tmp_path: Path) -> None:
    """The same checkpoint, written by transformers' save_pretrained: every prompt token's logprob, and
    the generated ones, match transformers' own log-softmax within 1e-5."""
    from hf_reference import save_hf_gpt2

    reference = save_hf_gpt2(tmp_path, seed=3, n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64)
    GPT2Tokenizer().save(tmp_path)
    app = create_app(load_model(tmp_path), load_tokenizer(tmp_path), "hf")
    ids = GPT2Tokenizer().encode("The quick brown fox jumps over the lazy dog, and then")
    with running_server(app) as url:
        body = httpx.post(url + "/v1/completions", json=dict(prompt=ids, max_tokens=8, temperature=1.0, seed=0,
                                                            logprobs=5, echo=True), timeout=TIMEOUT).json()
    lp = body["choices"][0]["logprobs"]
    generated = GPT2Tokenizer().encode(body["choices"][0]["text"])[len(ids):]
    assert len(lp["token_logprobs"]) == len(ids) + 8
    all_ids = ids + _token_ids(lp["tokens"][len(ids):])
    assert all_ids[len(ids):len(ids) + len(generated)] == generated[:8]
    with torch.no_grad():
        logp = reference(torch.tensor([all_ids])).logits[0].double().log_softmax(-1)  # (T, V)
    expected = [logp[t - 1, all_ids[t]].item() for t in range(1, len(all_ids))]
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected)) < 1e-5
    for t, top in enumerate(lp["top_logprobs"][1:], start=1):
        best = logp[t - 1].topk(5)
        names = [GPT2Tokenizer().decode([i]) for i in best.indices.tolist()]
        assert all(abs(top[n] - v) < 1e-5 for n, v in zip(names, best.values.tolist()))


def _token_ids(tokens: list[str]) -> list[int]:
    """The API's token strings back to GPT-2 ids (each is one whole token of the vocabulary)."""
    tok = GPT2Tokenizer()
    by_text = {tok.decode([i]): i for i in range(tok.vocab_size)}
    return [by_text[t] for t in tokens]


def test_sampling_fields_match_the_library(server: Served) -> None:
    fields = dict(presence_penalty=0.8, frequency_penalty=-0.4, logit_bias={"3": 4.0, "5": -100.0}, min_tokens=3,
                  stop_token_ids=[7], top_k=12, repetition_penalty=1.1, seed=9, temperature=1.1, max_tokens=15)
    body = server.post(prompt="Speak", **fields).json()
    params = dict(fields, logit_bias={3: 4.0, 5: -100.0}, stop_token_ids=(7,))
    params["max_new_tokens"] = params.pop("max_tokens")
    expected = server.expected("Speak", **params)
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)


@pytest.mark.parametrize("extreme", [dict(temperature=1e-45), dict(temperature=5e-324), dict(top_p=5e-324),
                                     dict(top_p=1e-45), dict(repetition_penalty=5e-324),
                                     dict(repetition_penalty=1e-45)])
def test_extreme_values_in_range_are_answered(server: Served, extreme: dict) -> None:
    response = server.post(prompt="All", max_tokens=6, seed=1, **extreme)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 6


def test_model_is_optional_and_endoftext_in_a_string_is_one_token(gpt2_server: Served) -> None:
    body = httpx.post(gpt2_server.url + "/v1/completions", json=dict(prompt="<|endoftext|>Hi", max_tokens=1),
                      timeout=TIMEOUT).json()
    assert body["model"] == "gpt2-tiny" and body["usage"]["prompt_tokens"] == 2
    assert gpt2_server.post("/tokenize", text="a<|endoftext|>b").json()["ids"] == [64, 50256, 65]


def test_vllm_tokenize_and_detokenize_shapes(gpt2_server: Served) -> None:
    vllm = gpt2_server.post("/tokenize", model="gpt2-tiny", prompt="Hello world", add_special_tokens=True).json()
    assert vllm == {"count": 2, "max_model_len": 64, "tokens": [15496, 995]}
    assert gpt2_server.post("/detokenize", model="gpt2-tiny", tokens=[15496, 995]).json() == {"prompt": "Hello world"}
    both = gpt2_server.post("/tokenize", text="a", prompt="b")
    assert both.status_code == 400 and both.json()["error"]["param"] == "text"
    assert gpt2_server.post("/tokenize", model="other", prompt="b").status_code == 404
    info = httpx.get(gpt2_server.url + "/tokenizer_info").json()  # what lm-eval's remote tokenizer reads
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>" and info["model_max_length"] == 64


def test_metrics_count_requests_tokens_queue_batch_and_time_to_first_token(server: Served) -> None:
    def sample(text: str, name: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[-1])

    before = httpx.get(server.url + "/metrics").text
    server.post(prompt="All", max_tokens=5, temperature=0)
    after = httpx.get(server.url + "/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert sample(text, 'gptlab_requests_total{outcome="completed"}') == sample(
        before, 'gptlab_requests_total{outcome="completed"}') + 1
    assert sample(text, "gptlab_generation_tokens_total") - sample(before, "gptlab_generation_tokens_total") == 5
    assert sample(text, "gptlab_prompt_tokens_total") - sample(before, "gptlab_prompt_tokens_total") == 3
    assert sample(text, "gptlab_time_to_first_token_seconds_count") == sample(
        before, "gptlab_time_to_first_token_seconds_count") + 1
    assert sample(text, "gptlab_batch_size_count") >= sample(before, "gptlab_batch_size_count") + 5
    for name in ("gptlab_queue_length", "gptlab_running_sequences", "gptlab_kv_cache_bytes",
                 "gptlab_requests_in_flight"):
        assert sample(text, name) >= 0


# -- every error in OpenAI's shape ----------------------------------------------------------------

@pytest.mark.parametrize("method, path, body, status, says", [
    ("GET", "/v1/nothing", None, 404, "no route GET /v1/nothing"),
    ("POST", "/v1/chat/completions", b"{}", 404, "no route POST /v1/chat/completions"),
    ("GET", "/v1/completions", None, 405, "use POST"),
    ("DELETE", "/v1/models", None, 405, "use GET"),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "not UTF-8: byte 0xff"),
    ("POST", "/v1/completions", '{"prompt": "é"}'.encode("latin-1"), 400, "not UTF-8"),
    ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "nests deeper than 32"),
    ("POST", "/v1/completions", b"[" * 5000 + b"]" * 5000, 400, "nests deeper than 32"),
    ("POST", "/tokenize", b'{"text": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400, "nests deeper"),
])
def test_framework_errors_have_openais_shape(server: Served, method: str, path: str, body: bytes | None,
                                             status: int, says: str) -> None:
    response = httpx.request(method, server.url + path, content=body, headers={"content-type": "application/json"},
                             timeout=TIMEOUT)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"]
    assert "detail" not in response.json()


# -- the official openai client -------------------------------------------------------------------

@pytest.mark.slow
def test_openai_client_completes_and_streams(server: Served) -> None:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    expected = server.expected("First Citizen:\n", max_new_tokens=12, temperature=0)
    completion = client.completions.create(model="tiny", prompt="First Citizen:\n", max_tokens=12, temperature=0)
    assert completion.choices[0].text == expected.text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    stream = client.completions.create(model="tiny", prompt="First Citizen:\n", max_tokens=12, temperature=0,
                                       stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected.text and len(pieces) > 2
    with pytest.raises(BadRequestError, match="at most 5000"):
        client.completions.create(model="tiny", prompt="All", max_tokens=10**6)


# -- the command line -----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_serves_a_run(tiny_run: Path) -> None:
    with socket.socket() as probe:  # a port free now; the server binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "gptlab", "serve", str(tiny_run), "--port", str(port), "--max-tokens-limit", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, process.communicate()[0]
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, "gptlab serve to start", seconds=180)
        ok = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "All", "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
        over = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "All", "max_tokens": 9})
        assert over.status_code == 400 and "at most 8" in over.json()["error"]["message"]
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    # it said where to go: the playground, the docs, a first request to try, the metrics
    assert f"playground:  {url}/" in output and f"{url}/docs" in output
    assert f"curl {url}/v1/completions" in output and f"{url}/metrics" in output


def test_cli_serve_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "warning: binding to 0.0.0.0" in err
    assert "gptlab serve: error:" in err and "Traceback" not in err
    for option, value, says in [("--max-batch", "0", "--max-batch must be at least 1"),
                                ("--max-queue", "0", "--max-queue must be at least 1"),
                                ("--kv-cache-mb", "0", "--kv-cache-mb must be at least 1"),
                                ("--port", "70000", "--port must be in 1-65535, got 70000"),
                                ("--port", "-1", "--port must be in 1-65535")]:
        assert main(["serve", str(tmp_path), option, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Traceback" not in err


def test_a_bf16_model_is_served_as_it_completes_offline(tiny_run: Path) -> None:
    """`serve --dtype bfloat16` (the loader's dtype): text and logprobs of the bf16 model itself."""
    from gptlab.inference import load_pretrained

    model, tokenizer = load_pretrained(tiny_run, "cpu", dtype="bfloat16")
    reference, _ = load_pretrained(tiny_run, "cpu", dtype="bfloat16")
    with running_server(create_app(model, tokenizer, "tiny", LIMITS)) as url:
        answer = httpx.post(url + "/v1/completions", json={"prompt": "the ", "max_tokens": 12, "temperature": 0,
                                                           "logprobs": 2}, timeout=TIMEOUT).json()["choices"][0]
    expected = complete(reference, tokenizer, [tokenizer.encode("the ")],
                        SamplingParams(max_new_tokens=12, temperature=0, logprobs=2))[0]
    assert answer["text"] == expected.text
    assert answer["logprobs"]["token_logprobs"] == pytest.approx([t.logprob for t in expected.logprobs])


def test_server_limits_check_themselves_naming_the_option() -> None:
    from gptlab.errors import GptlabError

    for field, option in [("max_tokens", "--max-tokens-limit"), ("max_body_bytes", "--max-body-bytes"),
                          ("kv_cache_mb", "--kv-cache-mb")]:
        for bad in (0, -3, 2.5, True, "8"):
            with pytest.raises(GptlabError, match=f"^{option} must be at least 1, got"):
                ServerLimits(**{field: bad})


def test_cli_serve_on_a_taken_port_is_one_line(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(tiny_run), "--port", str(taken.getsockname()[1])]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen on 127.0.0.1" in err and "choose another --port" in err


# -- lm-evaluation-harness against the server -----------------------------------------------------

@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_the_hf_model(gpt2_run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """lm-eval's `local-completions` model against `gptlab serve` (with the server's own tokenizer through
    /tokenizer_info, /tokenize and /detokenize, as lm-eval detects it) gives what `--model hf` gives on the
    same directory: a multiple-choice, a last-word, a rolling perplexity and a generation task, every
    document's answer within 1e-4."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra: pip install 'gptlab[eval]'")
    from lm_eval_reference import assert_same_scores, evaluate

    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                        ("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))):
        monkeypatch.setenv(name, value)

    app = create_app(load_model(gpt2_run_dir), load_tokenizer(gpt2_run_dir), "gpt2-run")
    with running_server(app) as url:
        # lm-eval's API models count the one generated token in max_length (they send max_length - 1 prompt
        # tokens at most): 65 lets the echoed prompts fill the 64-token context
        served = evaluate("local-completions", f"model=gpt2-run,base_url={url}/v1/completions,max_length=65,"
                                               f"num_concurrent=2,max_retries=1")
        assert app.state.service.metrics.stats().completions > 0
    # and score rolling windows one token shorter than the prompts they send (63 predicted tokens, after the
    # document-start token): hf reads the same windows with max_length=63 (with its default 64 the window
    # boundaries, and so the rolling score, would differ: a property of lm-eval's API models, not the server)
    reference = evaluate("hf", f"pretrained={gpt2_run_dir},dtype=float32,max_length=63")

    assert_same_scores(served, reference)


@pytest.fixture(scope="module")
def gpt2_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GPT with GPT-2's vocabulary and a 64-token context, saved as a Hugging Face directory (with
    GPT-2's tokenizer files) that `transformers` reads too; its weights are larger than at initialisation
    so that the continuations and choices differ in likelihood."""
    directory = tmp_path_factory.mktemp("gpt2-run")
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    save_model(model, directory)
    GPT2Tokenizer().save(directory)
    return directory
