"""A row that cannot be decoded fails alone: the engine retries a failed batch row by row, and the
others keep their tokens and their random generators; and the engine steps at the thread count it
measures fastest (`gptlab.threads`)."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import POISON, poison_forward, tiny_model
from gptlab.inference import Engine, SamplingParams, complete, generate
from gptlab.inference import engine as engine_module
from gptlab.inference.sampler import Sampler



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


# -- threads chosen by measurement ----------------------------------------------------------------

@pytest.mark.slow
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
