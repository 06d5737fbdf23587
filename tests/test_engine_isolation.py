"""A request that cannot be served fails alone (the engine and a real server on loopback), the server's
refusals in OpenAI's shape (logit_bias keys, n over the queue, foreign Host headers), the server's
start (batch size 1 measured before it listens, the rest while it waits), and the thread count that
inference and training choose by measurement (`gptlab.threads`)."""

from __future__ import annotations

import json
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from helpers import tiny_model
from gptlab.kernels import chooser
from gptlab.checkpoint import load_model, save_model
from gptlab.config import GPTConfig
from gptlab.serve.limits import ServerLimits
from gptlab.inference import Engine, SamplingParams, complete, generate
from gptlab.inference import engine as engine_module
from gptlab.inference.sampler import Sampler
from gptlab.model import GPT
from gptlab.serve import create_app, running_server
from gptlab.threads import EXPLOIT_STEPS, EXPLORE_STEPS, ThreadTuner, inference_adapts
from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer
from test_server import TIMEOUT, HeldEngine, Served, serve_tiny_run, wait_for

POISON = 7  # a token id whose presence in a forward pass's input makes the (patched) model raise


def poison_forward(model: GPT, monkeypatch: pytest.MonkeyPatch, poison: int = POISON) -> None:
    """The model raises on any batch whose input holds `poison`: a batch-level failure that one row causes."""
    hidden_states = model.hidden_states

    def failing(idx: torch.Tensor, *args, **kwargs):
        if (idx == poison).any():
            raise RuntimeError("injected: a poisoned row\nsecond line of the message")
        return hidden_states(idx, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing)


# -- the engine -----------------------------------------------------------------------------------

def test_a_row_that_fails_the_forward_pass_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    good = [[1, 2, 3], [4, 5, 6, 8, 9], [10]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0, stop_at_eos=False)
    expected = [generate(model, torch.tensor([p]), 6, temperature=0)[0, len(p):].tolist() for p in good]
    assert all(POISON not in e for e in expected)  # the good rows' own tokens never poison their batch
    poison_forward(model, monkeypatch)
    engine = Engine(model, max_batch=8, adapt_threads=False)
    rows = [engine.submit(p, greedy) for p in good[:2]]
    bad = engine.submit([1, POISON], greedy)
    rows.append(engine.submit(good[2], greedy))
    engine.run()
    assert [r.token_ids for r in rows] == expected
    assert all(r.finish_reason == "length" and r.error is None for r in rows)
    assert bad.done and bad.finish_reason is None and bad.token_ids == []
    assert str(bad.error).startswith("injected: a poisoned row")
    assert engine_module.failure_cause(bad.error) == "RuntimeError: injected: a poisoned row"


def test_a_failure_after_sampling_rewinds_the_others_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler has drawn every row's number and marked its token when the batch fails: the rows
    that step again alone draw the same numbers, with the same penalty state, as in a batch that never failed."""
    model = tiny_model()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11, repetition_penalty=1.3, stop_at_eos=False,
                            logprobs=2)
    prompts = [[1, 2, 3], [9, 8]]
    alone = complete(model, None, prompts, params)
    culprit = [5, 5, 5]
    sample = Sampler.__call__

    def failing(self, logits, rows):
        tokens = sample(self, logits, rows)
        if len(rows) > 1 and any(r.prompt == culprit for r in rows):
            raise ValueError("injected after sampling")
        return tokens

    monkeypatch.setattr(Sampler, "__call__", failing)
    engine = Engine(model, max_batch=4, adapt_threads=False)
    rows = [engine.submit(p, params) for p in prompts]
    odd = engine.submit(culprit, params)  # it fails only in company: alone, each step succeeds
    engine.run()
    assert [r.token_ids for r in rows] == [c.token_ids for c in alone]
    assert [e.logprob for r in rows for e in r.logprobs] == \
        pytest.approx([e.logprob for c in alone for e in c.logprobs], abs=1e-5)
    assert odd.error is None and len(odd.token_ids) == 8


def test_echo_logprobs_of_a_one_token_prompt() -> None:
    """It failed with `max() arg is an empty sequence`, and took its whole batch down with it."""
    model = tiny_model()
    engine = Engine(model, max_batch=4, adapt_threads=False)
    one = engine.submit([3], SamplingParams(max_new_tokens=2, temperature=0, logprobs=1, prompt_logprobs=1,
                                            stop_at_eos=False))
    other = engine.submit([1, 2], SamplingParams(max_new_tokens=2, temperature=0, stop_at_eos=False))
    engine.run()
    assert one.error is None and other.error is None
    assert [(e.token, e.logprob) for e in one.prompt_logprobs] == [(3, None)]
    assert len(one.token_ids) == 2 and len(one.logprobs) == 2
    assert other.token_ids == generate(model, torch.tensor([[1, 2]]), 2, temperature=0)[0, 2:].tolist()


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


# -- threads chosen by measurement ----------------------------------------------------------------

class FakeThreads:
    """torch's thread setting, as ThreadTuner sees it (no real threads change)."""

    def __init__(self, most: int) -> None:
        self.now = most
        self.history: list[int] = []

    def get(self) -> int:
        return self.now

    def set(self, n: int) -> None:
        self.now = n
        self.history.append(n)


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> FakeThreads:
    fake = FakeThreads(2)
    monkeypatch.setattr(torch, "get_num_threads", fake.get)
    monkeypatch.setattr(torch, "set_num_threads", fake.set)
    return fake


def run_steps(tuner: ThreadTuner, threads: FakeThreads, seconds: dict[int, float], steps: int,
              shape=None) -> list[int]:
    used = []
    for _ in range(steps):
        tuner.before_step(shape)
        used.append(threads.now)
        tuner.after_step(seconds[threads.now])
    return used


def test_tuner_takes_the_count_whose_steps_are_fastest(threads: FakeThreads) -> None:
    said: list[str] = []
    tuner = ThreadTuner(True, said.append, name="inference threads")
    look = 2 * EXPLORE_STEPS
    used = run_steps(tuner, threads, {1: 0.1, 2: 0.26}, look + 5)  # a busy machine: one thread 2.6x faster
    assert used[:look] == [2, 1] * EXPLORE_STEPS  # the look interleaves the counts, the one in use first
    assert used[look:] == [1] * 5 and tuner.best == 1
    assert said == ["inference threads: 1 thread(s) from now on (a step took 0.1 s at 1, 0.26 s at 2)"]
    # the machine quietens: the next look (after EXPLOIT_STEPS) finds two threads faster again
    used = run_steps(tuner, threads, {1: 0.1, 2: 0.06}, EXPLOIT_STEPS - 5 + look + 3)
    assert used[-3:] == [2, 2, 2] and tuner.best == 2
    tuner.restore()
    assert threads.now == 2


def test_tuner_compares_steps_of_one_shape_only(threads: FakeThreads) -> None:
    tuner = ThreadTuner(True, lambda _: None)
    # two threads run the big shape faster; each big step takes longer than any small step at either count
    for step in range(40):
        shape = "big" if step % 2 else "small"
        tuner.before_step(shape)
        n = threads.now
        tuner.after_step({("small", 1): 0.01, ("small", 2): 0.02, ("big", 1): 2.0, ("big", 2): 1.0}[shape, n])
        if not tuner.looking:
            break
    assert tuner.best == 1  # the small shape finished its look first (it came first): 1 thread wins there
    assert not tuner.looking


def test_tuner_is_off_when_disabled_or_with_one_thread(threads: FakeThreads, monkeypatch) -> None:
    for tuner in (ThreadTuner(False, print), ):
        run_steps(tuner, threads, {2: 0.1}, 10)
        assert threads.history == [] and not tuner.active
    threads.now = 1
    tuner = ThreadTuner(True, print)
    run_steps(tuner, threads, {1: 0.1}, 10)
    assert threads.history == [] and not tuner.active
    monkeypatch.setenv("GPTLAB_ADAPT_THREADS", "0")
    assert not inference_adapts("cpu")
    monkeypatch.setenv("GPTLAB_ADAPT_THREADS", "")
    assert inference_adapts("cpu") and not inference_adapts("meta")


def test_the_engine_steps_at_the_measured_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock makes every step at two threads 2.6x slower: the engine settles on one thread, gives
    torch its setting back when it goes idle, and its tokens are the model's greedy ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_model()
        expected = generate(model, torch.tensor([[1, 2, 3]]), 12, temperature=0)[0, 3:].tolist()
        now = [0.0]

        def perf_counter() -> float:
            now[0] += 0.13 if torch.get_num_threads() == 2 else 0.05
            return now[0]

        monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
        counts: list[int] = []
        engine = Engine(model, max_batch=2, adapt_threads=True)
        step = engine._decode
        monkeypatch.setattr(engine, "_decode", lambda rows: (counts.append(torch.get_num_threads()), step(rows))[1])
        row = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False))
        engine.run()
        assert engine.threads.best == 1 and counts[-3:] == [1, 1, 1] and 2 in counts
        assert torch.get_num_threads() == 2  # restored when the engine went idle
        assert row.token_ids == expected
        monkeypatch.setenv("GPTLAB_ADAPT_THREADS", "off")
        assert not Engine(model).threads.active
    finally:
        torch.set_num_threads(before)
