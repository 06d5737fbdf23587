"""The inference engine: its KV cache against the plain model, continuous batching, every sampling
control, log-probabilities, streaming, extreme values, the CLI.

The reference everywhere is `GPT.forward` on the whole context (no cache, all logits), written out
in the test so that it does not share code with the engine it checks.
"""

from __future__ import annotations

import math
import string
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.inference import Completion, Engine, SamplingParams, TextStream, complete, generate
from gptlab.inference.cache import SlotCache
from gptlab.inference.sampler import Sampler
from gptlab.model import GPT
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer

CHARS = CharTokenizer(list(string.ascii_letters[:50]))  # one character per id of a 50-token tiny model
GREEDY = dict(temperature=0.0, stop_at_eos=False)


def reference_greedy(model: GPT, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by the documented window rule, recomputing every step with model.forward."""
    block = model.config.block_size
    context, tokens, logits = list(prompt[-block:]), [], []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([context])).logits[0, -1]
            logits.append(last)
            tokens.append(int(last.argmax()))
            context.append(tokens[-1])
            if len(context) > block:
                context = context[-(block // 2):]
    return tokens, logits


def prompts_of(lengths: list[int], vocab: int = 50, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def rows_of(params: list[SamplingParams], generator: torch.Generator | None = None, prompt=(0,)) -> list:
    """Stand-ins for the engine's sequences, as the sampler reads them."""
    return [SimpleNamespace(params=p, prompt=list(prompt), token_ids=[], generator=generator, stop_ids=frozenset())
            for p in params]


def sampled_frequencies(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """The frequency of each token in n draws by the sampler from the same (1, V) logits."""
    rows = rows_of([params] * n, torch.Generator().manual_seed(0))
    draws = Sampler(logits.size(-1), n, torch.device("cpu"))(logits.expand(n, -1), rows)
    return torch.bincount(draws, minlength=logits.size(-1)) / n


def processed(logits: torch.Tensor, params: SamplingParams, prompt=(0,), generated=()) -> torch.Tensor:
    """The logits one row samples from, after bias, min_tokens and penalties."""
    sampler = Sampler(logits.size(-1), 1, torch.device("cpu"))
    row = rows_of([params], prompt=prompt)[0]
    row.token_ids = list(generated)
    row.stop_ids = frozenset({0})
    sampler.join(0, row)
    return sampler.processed(logits, [row])


class Recording:
    """Wraps an engine's sampler: keeps the logits of every step, to compare them with the plain model."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.logits = sampler, []

    def __call__(self, logits: torch.Tensor, rows) -> torch.Tensor:
        self.logits.append(logits.clone())
        return self.sampler(logits, rows)

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)


# --- the KV cache --------------------------------------------------------------------------------


def test_slot_cache_decodes_rows_of_different_lengths_as_the_uncached_model() -> None:
    model = tiny_model(block_size=16)
    seq = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    expected = model(seq).logits  # (B, T, V)
    lengths = [5, 2, 9]  # each row's prompt; the prefill right-pads them to 9
    cache = SlotCache(model.config, device=torch.device("cpu"), dtype=torch.float32)
    cache.ensure(3, 16)
    with torch.inference_mode():
        h = model.hidden_states(seq[:, :9], cache.prefill(0, 3))  # (3, 9, C)
        for row, n in enumerate(lengths):
            torch.testing.assert_close(model.lm_head(h[row, :n]), expected[row, :n], rtol=0, atol=1e-5)
        for step in range(16 - max(lengths)):  # then one token per row per step, each at its own length
            at = [n + step for n in lengths]
            idx = seq[torch.arange(3), torch.tensor(at)][:, None]  # (3, 1)
            got = model.lm_head(model.hidden_states(idx, cache.decode(at))[:, -1])  # (3, V)
            torch.testing.assert_close(got, expected[torch.arange(3), torch.tensor(at)], rtol=0, atol=1e-5)


def test_a_growing_cache_never_makes_slots_past_the_engines_batch() -> None:
    """Growing ahead doubles the slots, but not past max_slots: slots no sequence can use cost a zero-fill
    of the whole cache (a 16th sequence joining 15 once grew a GPT-2 cache to 30 slots, 557 MB, 1.45 s)."""
    model = tiny_model(block_size=16)
    cache = SlotCache(model.config, device=torch.device("cpu"), dtype=torch.float32, max_slots=16)
    cache.ensure(15, 8, ahead=True)
    cache.ensure(16, 8, ahead=True)
    assert cache.slots == 16
    cache.ensure(16, 9, ahead=True)  # the positions still grow ahead
    assert (cache.slots, cache.capacity) == (16, 16)
    small = SlotCache(model.config, device=torch.device("cpu"), dtype=torch.float32, max_slots=16)
    small.ensure(2, 8, ahead=True)
    small.ensure(5, 8, ahead=True)  # more slots: the positions stay as they are
    assert (small.slots, small.capacity) == (10, 8)
    engine = Engine(model, max_batch=5)
    assert engine.cache.max_slots == 5


def test_cached_greedy_tokens_equal_uncached_within_the_context() -> None:
    model = tiny_model(block_size=32)
    prompt = prompts_of([6])[0]
    expected, _ = reference_greedy(model, prompt, 26)  # fills the 32-token context exactly
    idx = torch.tensor([prompt])
    cached = generate(model, idx, 26, temperature=0)
    uncached = generate(model, idx, 26, temperature=0, use_cache=False)
    assert cached[0, 6:].tolist() == expected
    assert torch.equal(cached, uncached)


def test_sliding_window_beyond_block_size_is_exact_against_the_uncached_model_on_the_window() -> None:
    model = tiny_model(block_size=16)
    prompt = prompts_of([20])[0]  # longer than the context: only its last 16 tokens are seen
    steps = 36  # the window slides at step 1, then every 8 tokens
    expected_tokens, expected_logits = reference_greedy(model, prompt, steps)
    engine = Engine(model, max_batch=1)
    engine.sampler = recording = Recording(engine.sampler)
    row = engine.submit(prompt, SamplingParams(max_new_tokens=steps, **GREEDY))
    engine.run()
    assert row.token_ids == expected_tokens
    torch.testing.assert_close(torch.cat(recording.logits), torch.stack(expected_logits), rtol=0, atol=1e-5)
    assert generate(model, torch.tensor([prompt]), steps, temperature=0, use_cache=False)[0, 20:].tolist() == row.token_ids


def test_cache_memory_is_two_tensors_of_the_used_context() -> None:
    model = tiny_model(block_size=64)
    engine = Engine(model, max_batch=3, prefill_tokens=None)
    for prompt in prompts_of([10, 7, 3]):
        engine.submit(prompt, SamplingParams(max_new_tokens=20, **GREEDY))
    engine.step()
    c = model.config
    T = 10 + 20 - 1  # the last token is never fed back
    assert engine.cache.nbytes() == 2 * c.n_layer * 3 * T * c.n_embd * 4


def test_generate_keeps_its_shape_and_signature() -> None:
    model = tiny_model()
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), 5, temperature=1.0, top_k=5, top_p=0.9,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8)
    assert generate(model, torch.zeros(1, 3, dtype=torch.long), 0).shape == (1, 3)


def test_generation_leaves_the_training_mode_as_it_was() -> None:
    model = tiny_model(dropout=0.5).train()
    out = generate(model, torch.zeros(1, 2, dtype=torch.long), 4, temperature=0)
    assert model.training
    assert out[0, 2:].tolist() == reference_greedy(model.eval(), [0, 0], 4)[0]


def test_eval_mode_gives_the_model_back_as_it_was_even_after_an_error() -> None:
    from gptlab.inference import eval_mode

    model = tiny_model(dropout=0.5).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not any(module.training for module in model.modules())
        raise RuntimeError("the reader failed")
    assert all(module.training for module in model.modules())
    with eval_mode(model.eval()):
        pass
    assert not model.training


def test_load_pretrained_gives_the_model_in_eval_mode_dtype_and_quantization_asked(tiny_run, tmp_path) -> None:
    from gptlab.errors import GptlabError
    from gptlab.inference import load_pretrained
    from gptlab.quantize import Int8Linear

    from gptlab.kernels import force

    with force(int8_step="int8 weights"):  # the whole-step verdict pinned (test_quantize_step.py measures it)
        model, tokenizer = load_pretrained(tiny_run, "cpu", dtype="bfloat16", quantize="int8")
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size
    assert model.transformer.wpe.weight.dtype == torch.bfloat16 and isinstance(model.lm_head, Int8Linear)
    for bad in (dict(dtype="float64"), dict(quantize="int4")):  # refused before any file is read
        with pytest.raises(GptlabError, match=next(iter(bad))):
            load_pretrained(tmp_path / "missing", **bad)


# --- continuous batching -------------------------------------------------------------------------


MIXED = [  # one batch, every row with its own parameters
    SamplingParams(max_new_tokens=14, **GREEDY),
    SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=7, stop_at_eos=False),
    SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.8, seed=3, stop_at_eos=False),
    SamplingParams(max_new_tokens=20, temperature=1.3, repetition_penalty=1.4, presence_penalty=0.5,
                   frequency_penalty=1.0, seed=11, stop_at_eos=False),
    SamplingParams(max_new_tokens=17, temperature=0.9, logit_bias={3: 5.0, 4: -100}, seed=5, stop_at_eos=False),
    SamplingParams(max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9, seed=1, logprobs=3, stop_at_eos=False),
    SamplingParams(max_new_tokens=12, temperature=0.8, seed=2, stop_token_ids=(7,), min_tokens=4),
]


def alone(model: GPT, prompt: list[int], params: SamplingParams) -> Completion:
    return complete(model, CHARS, [prompt], params)[0]


def test_every_row_of_a_mixed_batch_gets_the_tokens_it_gets_alone() -> None:
    model = tiny_model(block_size=16)
    prompts = prompts_of([1, 4, 9, 13, 16, 6, 3])  # 13 + 20 > 16: windows slide
    engine = Engine(model, CHARS, max_batch=len(prompts))
    rows = [engine.submit(p, params) for p, params in zip(prompts, MIXED)]
    engine.run()
    for row, prompt, params in zip(rows, prompts, MIXED):
        expected = alone(model, prompt, params)
        assert (row.text_so_far, row.token_ids, row.finish_reason) == (
            expected.text, expected.token_ids, expected.finish_reason)
        if params.logprobs is not None:  # the same numbers up to float rounding (batched products)
            assert [(e.token, list(e.top)) for e in row.logprobs] == [(e.token, list(e.top)) for e in expected.logprobs]
            got = [v for e in row.logprobs for v in (e.logprob, *e.top.values())]
            assert got == pytest.approx([v for e in expected.logprobs for v in (e.logprob, *e.top.values())], abs=1e-5)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=7)])
def test_batched_prompts_of_different_lengths_equal_one_by_one(sampling: dict) -> None:
    model = tiny_model(block_size=16)
    prompts = prompts_of([1, 4, 9, 13, 16])
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False, **sampling)  # 13 + 20 > 16: windows slide
    batched = complete(model, CHARS, prompts, params)
    assert batched == [alone(model, p, params) for p in prompts]
    assert all(len(c.token_ids) == 20 and c.finish_reason == "length" for c in batched)


class CountingModel(GPT):
    """Counts forward passes and the rows in each."""

    def __init__(self, model: GPT) -> None:
        super().__init__(model.config)
        self.load_state_dict(model.state_dict())
        self.eval()
        self.passes: list[tuple[int, int]] = []  # (rows, tokens per row)

    def hidden_states(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        self.passes.append(tuple(idx.shape))
        return super().hidden_states(idx, cache)


def test_a_request_joins_the_running_batch_at_the_next_step_and_leaves_when_done() -> None:
    model = CountingModel(tiny_model(block_size=64))
    engine = Engine(model, CHARS, max_batch=4)
    first = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=12, **GREEDY))
    for _ in range(4):
        engine.step()
    second = engine.submit([4, 5], SamplingParams(max_new_tokens=3, temperature=1.0, seed=9, stop_at_eos=False))
    model.passes.clear()
    engine.step()  # the first row decodes one token while the second reads its prompt
    assert model.passes == [(1, 1), (1, 2)] and len(second.token_ids) == 1
    engine.step()
    assert model.passes[2:] == [(2, 1)]  # from then on both advance in one pass
    engine.step()
    assert second.done and engine.rows == [first]  # a finished row leaves at once
    engine.run()
    assert first.token_ids == alone(model, [1, 2, 3], first.params).token_ids
    assert second.token_ids == alone(model, [4, 5], second.params).token_ids
    assert engine.cache.nbytes() == 0  # an idle engine holds no cache


def test_a_cancelled_row_leaves_before_the_next_pass_and_the_others_are_unchanged() -> None:
    model = CountingModel(tiny_model(block_size=64))
    engine = Engine(model, CHARS, max_batch=3)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=4, stop_at_eos=False)
    rows = [engine.submit(p, params) for p in prompts_of([3, 5, 2])]
    engine.step()
    engine.step()
    engine.cancel(rows[0])
    model.passes.clear()
    engine.step()
    assert model.passes == [(2, 1)] and engine.rows == [rows[2], rows[1]]  # the last row took slot 0
    engine.run()
    assert rows[0].finish_reason is None and len(rows[0].token_ids) == 2
    for row, prompt in zip(rows[1:], prompts_of([3, 5, 2])[1:]):
        assert row.token_ids == alone(model, prompt, params).token_ids


def test_the_cache_budget_bounds_the_batch_and_waiting_rows_join_first_come_first_served() -> None:
    model = tiny_model(block_size=32)
    per_row = 2 * model.config.n_layer * model.config.n_embd * 4 * 16  # 16 positions of one row
    engine = Engine(model, CHARS, max_batch=8, kv_cache_bytes=2 * per_row)
    params = SamplingParams(max_new_tokens=13, **GREEDY)  # 3 + 13 - 1 = 15 positions each
    prompts = prompts_of([3, 3, 3, 3, 3])
    rows = [engine.submit(p, params) for p in prompts]
    running = []
    while engine.busy:
        engine.step()
        running.append([rows.index(r) for r in engine.rows])
    assert max(map(len, running)) == 2
    finished_order = sorted(range(5), key=lambda i: next(s for s, now in enumerate(running) if i not in now
                                                          and any(i in r for r in running[:s])))
    assert finished_order == [0, 1, 2, 3, 4]
    assert [r.token_ids for r in rows] == [alone(model, p, params).token_ids for p in prompts]
    with pytest.raises(ValueError, match="KV cache"):  # 20 + 20 - 1 positions, over a budget of 16
        Engine(model, CHARS, kv_cache_bytes=per_row).submit([1] * 20, SamplingParams(max_new_tokens=20))


def test_a_failing_step_fails_its_batch_and_the_engine_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(block_size=32)
    engine = Engine(model, CHARS, max_batch=2)
    params = SamplingParams(max_new_tokens=6, **GREEDY)
    rows = [engine.submit(p, params) for p in ([1], [2])]
    engine.step()

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(model, "hidden_states", broken)
    assert engine.step() == rows
    assert all(isinstance(r.error, RuntimeError) and r.done for r in rows) and not engine.busy
    assert engine.cache.nbytes() == 0
    monkeypatch.undo()
    again = engine.submit([3], params)
    engine.run()
    assert again.error is None and again.token_ids == alone(model, [3], params).token_ids


def test_a_failing_row_fails_alone() -> None:
    class Broken(CharTokenizer):
        def decode_bytes(self, ids):
            if 13 in ids:
                raise RuntimeError("undecodable")
            return super().decode_bytes(ids)

    model = tiny_model(block_size=32)
    engine = Engine(model, Broken(CHARS.chars), max_batch=2)
    bad = engine.submit([1], SamplingParams(max_new_tokens=5, logit_bias={13: 100}, **GREEDY))
    good = engine.submit([2], SamplingParams(max_new_tokens=5, **GREEDY))
    engine.run()
    assert isinstance(bad.error, RuntimeError) and bad.finish_reason is None
    assert good.error is None and good.token_ids == alone(model, [2], good.params).token_ids


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others() -> None:
    model = tiny_model(block_size=32)
    prompts = prompts_of([3, 8, 5])
    free = complete(model, CHARS, prompts, SamplingParams(max_new_tokens=20, **GREEDY))
    stop = free[1].text[4:6]  # row 1 stops after a few tokens
    params = SamplingParams(max_new_tokens=20, stop=(stop,), **GREEDY)
    batched = complete(model, CHARS, prompts, params)
    assert batched == [complete(model, CHARS, [p], params)[0] for p in prompts]
    assert batched[1].finish_reason == "stop" and len(batched[1].token_ids) < 20


# --- sampling controls ---------------------------------------------------------------------------


def test_greedy_follows_the_argmax_of_the_model() -> None:
    model = tiny_model()
    prompt = prompts_of([5])[0]
    out = complete(model, CHARS, [prompt], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    assert out.token_ids == reference_greedy(model, prompt, 12)[0]
    assert out.text == CHARS.decode(out.token_ids) and out.prompt_tokens == 5


def test_temperature_scales_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = sampled_frequencies(logits, SamplingParams(temperature=0.5), n=20_000)
    expected = torch.softmax(logits[0] / 0.5, -1)
    torch.testing.assert_close(draws, expected, rtol=0, atol=0.015)


def test_top_k_keeps_the_k_most_likely_tokens() -> None:
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, -1.0]])
    draws = sampled_frequencies(logits, SamplingParams(temperature=1.0, top_k=2), n=4000)
    assert set(draws.nonzero().flatten().tolist()) == {1, 3}
    expected = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]) * math.e / (math.e + 1) + torch.tensor([0, 0, 0, 1.0, 0]) / (math.e + 1)
    torch.testing.assert_close(draws, expected, rtol=0, atol=0.03)


@pytest.mark.parametrize("top_p, support", [(0.5, {1}), (0.8, {1, 2}), (0.81, {1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p: float, support: set) -> None:
    logits = torch.tensor([[0.05, 0.5, 0.3, 0.15]]).log()
    draws = sampled_frequencies(logits, SamplingParams(temperature=1.0, top_p=top_p), n=4000)
    assert set(draws.nonzero().flatten().tolist()) == support


def test_penalties_and_biases_change_the_logits_as_documented() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    # CTRL: a seen token (prompt 0, 1) is divided by the penalty if positive, multiplied if negative
    assert processed(logits, SamplingParams(repetition_penalty=2.0), prompt=[0, 1]).tolist() == [
        [1.0, -4.0, 2.0, -2.0, 1.0]]
    # OpenAI: minus presence once per generated token, minus frequency per time (the prompt does not count)
    assert processed(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[4],
                     generated=[2, 2, 3]).tolist() == [[2.0, -2.0, 1.0, -2.75, 1.0]]
    assert processed(logits, SamplingParams(logit_bias={1: 3.0, 4: -100})).tolist() == [[2.0, 1.0, 2.0, -2.0, -99.0]]
    # min_tokens: the stop ids (here 0) cannot come yet
    assert processed(logits, SamplingParams(min_tokens=2), generated=[3]).tolist() == [
        [-math.inf, -2.0, 2.0, -2.0, 1.0]]
    assert processed(logits, SamplingParams(min_tokens=2), generated=[3, 3]).tolist() == logits.tolist()


def test_a_strong_repetition_penalty_stops_greedy_loops() -> None:
    model = tiny_model(vocab_size=50, block_size=64)
    prompt = [0, 1, 2]
    looping = complete(model, CHARS, [prompt], SamplingParams(max_new_tokens=40, **GREEDY))[0].token_ids
    assert len(set(looping)) < 40  # a random tiny model repeats itself
    penalized = complete(model, CHARS, [prompt], SamplingParams(max_new_tokens=40, repetition_penalty=1e6,
                                                                 **GREEDY))[0].token_ids
    assert len(set(penalized)) == 40 and not set(penalized) & set(prompt)


def test_top_k_1_and_a_tiny_top_p_are_greedy() -> None:
    model = tiny_model()
    prompt = prompts_of([4])[0]
    greedy = complete(model, CHARS, [prompt], SamplingParams(max_new_tokens=15, **GREEDY))[0]
    for extra in (dict(top_k=1), dict(top_p=1e-9)):
        sampled = complete(model, CHARS, [prompt], SamplingParams(max_new_tokens=15, temperature=1.5, seed=3,
                                                                  stop_at_eos=False, **extra))[0]
        assert sampled.token_ids == greedy.token_ids


@pytest.mark.parametrize("n", [0, 1, 7])
def test_max_new_tokens_is_exact(n: int) -> None:
    out = complete(tiny_model(), CHARS, [[1, 2]], SamplingParams(max_new_tokens=n, seed=0))[0]
    assert len(out.token_ids) == n and len(out.text) == n and out.finish_reason == "length"


def test_seed_gives_the_same_text_on_every_run_and_different_seeds_differ() -> None:
    model = tiny_model()
    params = dict(max_new_tokens=30, temperature=1.0, top_p=0.95)
    runs = [complete(model, CHARS, [[3]], SamplingParams(seed=s, **params))[0].text for s in (11, 11, 12)]
    assert runs[0] == runs[1] != runs[2]
    torch.manual_seed(0)  # between seeded runs the global RNG may be anywhere
    assert complete(model, CHARS, [[3]], SamplingParams(seed=11, **params))[0].text == runs[0]


class EosChars(CharTokenizer):
    """The 50-character vocabulary with one of its ids declared the end-of-text token."""

    def __init__(self, eos: int) -> None:
        super().__init__(CHARS.chars)
        self._eos = eos

    @property
    def eos_id(self) -> int | None:
        return self._eos


def test_generation_stops_at_eos_and_leaves_it_out_of_the_text() -> None:
    model = tiny_model()
    free = complete(model, CHARS, [[5]], SamplingParams(max_new_tokens=20, **GREEDY))[0].token_ids
    eos = free[6]
    first = free.index(eos)
    out = complete(model, EosChars(eos), [[5]], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    assert out == Completion(CHARS.decode(free[:first]), free[: first + 1], "stop", 1)
    ignored = complete(model, EosChars(eos), [[5]], SamplingParams(max_new_tokens=20, **GREEDY))[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def first_stop(text: str, stops: tuple[str, ...]) -> tuple[str, int]:
    """What a stop rule must return: the text before the first stop string to complete, and its end."""
    for end in range(1, len(text) + 1):
        starts = [text[:end].find(s) for s in stops if s in text[:end]]
        if starts:
            return text[: min(starts)], end
    raise AssertionError("no stop string in the text")


def test_several_stop_strings_including_ones_that_span_tokens() -> None:
    model = tiny_model(block_size=64)
    free = complete(model, CHARS, [[1, 2, 3]], SamplingParams(max_new_tokens=40, **GREEDY))[0]
    stops = ("zzzz", free.text[12:15], free.text[20:22])  # never, a 3-token and a 2-token string
    out = complete(model, CHARS, [[1, 2, 3]], SamplingParams(max_new_tokens=40, stop=stops, **GREEDY))[0]
    text, end = first_stop(free.text, stops)
    assert (out.text, out.token_ids, out.finish_reason) == (text, free.token_ids[:end], "stop")
    assert len(out.token_ids) <= 15


def test_a_stop_string_may_start_inside_a_token() -> None:
    script = GPT2Tokenizer().encode("Hello world, this is fine")
    stream = TextStream(Scripted(script), GPT2Tokenizer(), [0], SamplingParams(max_new_tokens=20,
                                                                              temperature=0, stop=("orl",)))
    assert "".join(stream) == "Hello w" and stream.finish_reason == "stop"
    assert stream.completion_tokens == 2  # "Hello", " world"


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot() -> None:
    tok = GPT2Tokenizer()
    script = tok.encode("Hello world.")
    params = SamplingParams(max_new_tokens=3, temperature=0, stop=("world!",))
    assert list(TextStream(Scripted(script), tok, [0], params)) == ["Hello", " ", "world."]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
    ("max_new_tokens", -1), ("repetition_penalty", 0.0), ("seed", -1), ("stop", "abc"), ("stop", ("",)),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logit_bias", {1: 101}), ("logit_bias", {-1: 1}),
    ("stop_token_ids", (-2,)), ("min_tokens", 200), ("logprobs", 21), ("prompt_logprobs", -1),
])
def test_invalid_values_raise_a_clear_value_error(field: str, value: object) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()
    with pytest.raises(ValueError, match=field):
        complete(tiny_model(), CHARS, [[1]], params)
    with pytest.raises(ValueError, match=field):
        TextStream(tiny_model(), CHARS, [1], params)


def test_invalid_prompts_raise_a_value_error() -> None:
    for prompts in ([], [[]], [[1, 50]], [[-1]]):
        with pytest.raises(ValueError, match="prompt"):
            complete(tiny_model(), CHARS, prompts, SamplingParams())
    with pytest.raises(ValueError, match="stop_token_ids names token 50"):
        complete(tiny_model(), CHARS, [[1]], SamplingParams(stop_token_ids=(50,)))


# --- streaming -----------------------------------------------------------------------------------


class Scripted(GPT):
    """A GPT-2-vocabulary model whose greedy continuation is a fixed script, to force token splits."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=1, n_embd=4))
        self.script = script
        self.calls = 0
        self.lm_head = torch.nn.Identity()  # hidden_states already yields the logits

    def hidden_states(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """The script's next token, as a one-hot vector that `lm_head` below passes through."""
        if cache is not None:
            cache.positions(idx.size(1))
        h = torch.zeros(idx.size(0), idx.size(1), self.config.vocab_size)
        h[:, -1, self.script[self.calls]] = 1.0
        self.calls += 1
        return h


@pytest.mark.parametrize("text", ["a🙂b", "你好 world", " 🤖!é"])
def test_streaming_never_yields_a_broken_utf8_character(text: str) -> None:
    tok = GPT2Tokenizer()
    script = tok.encode(text)
    assert any(b"\xef\xbf\xbd" in tok.decode(script[:i]).encode() for i in range(len(script)))  # splits exist
    stream = TextStream(Scripted(script), tok, [0], SamplingParams(max_new_tokens=len(script), temperature=0))
    pieces = list(stream)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert stream.finish_reason == "length" and stream.completion_tokens == len(script)


def test_a_character_cut_by_max_new_tokens_ends_as_one_replacement_character() -> None:
    tok = GPT2Tokenizer()
    script = tok.encode("a🙂")  # [a, first half, second half]
    pieces = list(TextStream(Scripted(script), tok, [0], SamplingParams(max_new_tokens=2, temperature=0)))
    assert pieces == ["a", "\ufffd"]


def test_stream_pieces_add_up_to_the_completion_and_close_stops_early() -> None:
    model = tiny_model()
    params = SamplingParams(max_new_tokens=25, temperature=1.0, seed=5, stop=("xyz",))
    stream = TextStream(model, CHARS, [1, 2], params)
    pieces = list(stream)
    done = complete(model, CHARS, [[1, 2]], params)[0]
    assert len(pieces) > 1 and "".join(pieces) == done.text
    assert (stream.finish_reason, stream.completion_tokens) == (done.finish_reason, len(done.token_ids))

    early = TextStream(model, CHARS, [1, 2], params)
    next(early)
    early.close()
    assert list(early) == [] and early.finish_reason is None and early.completion_tokens == 1


@pytest.mark.slow
def test_bfloat16_generation_runs_with_a_bfloat16_cache() -> None:
    model = tiny_model().to(torch.bfloat16)
    engine = Engine(model, CHARS)
    row = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5, seed=0))
    engine.step()
    assert engine.cache.kv.dtype == torch.bfloat16
    engine.run()
    assert len(row.token_ids) == 5


# --- log-probabilities ---------------------------------------------------------------------------


def test_logprobs_are_the_models_log_softmax_for_the_prompt_and_the_output() -> None:
    model = tiny_model(block_size=32)
    prompt = prompts_of([6])[0]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=10, seed=2, logprobs=3, prompt_logprobs=2,
                            stop_at_eos=False)
    out = complete(model, CHARS, [prompt], params)[0]
    seq = torch.tensor([prompt + out.token_ids])
    logp = model(seq).logits[0].log_softmax(-1)  # (T, V): position t predicts token t + 1
    assert [e.token for e in out.prompt_logprobs] == prompt and out.prompt_logprobs[0].logprob is None
    for t, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.logprob == pytest.approx(logp[t - 1, prompt[t]].item(), abs=1e-5)
        assert list(entry.top)[:2] == logp[t - 1].topk(2).indices.tolist()
    for j, entry in enumerate(out.logprobs):  # the model's own distribution, before temperature and top-k
        t = len(prompt) + j - 1
        assert entry.token == out.token_ids[j]
        assert entry.logprob == pytest.approx(logp[t, entry.token].item(), abs=1e-5)
        top = logp[t].topk(3)
        assert {i: round(v, 5) for i, v in entry.top.items() if i in top.indices.tolist()} == {
            i: round(v, 5) for i, v in zip(top.indices.tolist(), top.values.tolist())}
        assert entry.token in entry.top  # the chosen token is always among the alternatives


def test_prompt_logprobs_with_no_new_tokens() -> None:
    model = tiny_model(block_size=32)
    out = complete(model, CHARS, [[1, 2, 3]], SamplingParams(max_new_tokens=0, prompt_logprobs=0))[0]
    assert out.token_ids == [] and out.finish_reason == "length" and len(out.prompt_logprobs) == 3
    logp = model(torch.tensor([[1, 2, 3]])).logits[0].log_softmax(-1)
    assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx([logp[0, 2].item(), logp[1, 3].item()], abs=1e-5)


# --- stop ids, min_tokens, extreme values --------------------------------------------------------


def test_stop_token_ids_end_the_text_and_min_tokens_holds_them_off() -> None:
    model = tiny_model()
    free = complete(model, CHARS, [[5]], SamplingParams(max_new_tokens=20, **GREEDY))[0].token_ids
    stop = free[6]
    first = free.index(stop)
    out = complete(model, CHARS, [[5]], SamplingParams(max_new_tokens=20, stop_token_ids=(stop,), **GREEDY))[0]
    assert out == Completion(CHARS.decode(free[:first]), free[:first + 1], "stop", 1)
    held = complete(model, EosChars(stop), [[5]], SamplingParams(max_new_tokens=20, temperature=0.0,
                                                                 min_tokens=first + 2))[0]
    assert len(held.token_ids) >= first + 2 and stop not in held.token_ids[:first + 1]


@pytest.mark.parametrize("extreme", [
    dict(temperature=1e-45), dict(temperature=5e-324), dict(top_p=1e-45), dict(top_p=5e-324),
    dict(repetition_penalty=1e-45), dict(repetition_penalty=5e-324), dict(repetition_penalty=1e300),
    dict(temperature=1e300),
])
def test_extreme_values_in_range_sample_valid_tokens(extreme: dict) -> None:
    model = tiny_model(block_size=32)
    params = SamplingParams(max_new_tokens=20, temperature=extreme.pop("temperature", 1.0), seed=0,
                            stop_at_eos=False, **extreme)
    params.validate()
    out = complete(model, CHARS, [[1, 2, 3]], params)[0]
    assert len(out.token_ids) == 20 and all(0 <= t < 50 for t in out.token_ids)
    if params.temperature < 1e-30 or (params.top_p or 1) < 1e-30:  # the limit is greedy
        assert out.token_ids == complete(model, CHARS, [[1, 2, 3]], SamplingParams(max_new_tokens=20, **GREEDY)
                                         )[0].token_ids


# --- the command line ----------------------------------------------------------------------------


class Recorder:
    """A stdout that remembers every write and flush, to see text leave piece by piece."""

    def __init__(self) -> None:
        self.events: list[str | None] = []

    def write(self, text: str) -> int:
        self.events.append(text)
        return len(text)

    def flush(self) -> None:
        self.events.append(None)


def test_gptlab_sample_streams_to_the_terminal(tiny_run, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    args = [str(tiny_run), "--prompt", "All:", "--max-new-tokens", "30", "--seed", "4", "--stop", "zz"]
    assert main(["sample", *args]) == 0
    flushed_writes = [e for e, after in zip(out.events, out.events[1:]) if e and after is None]
    assert len(flushed_writes) > 1  # text reached the terminal before generation ended
    text = "".join(e for e in out.events if e)

    from gptlab.checkpoint import load_model
    from gptlab.tokenizers import load_tokenizer

    tok = load_tokenizer(tiny_run)
    expected = complete(load_model(tiny_run), tok, [tok.encode("All:")],
                        SamplingParams(max_new_tokens=30, temperature=0.8, seed=4, stop=("zz",)))[0]
    assert text == "All:" + expected.text + "\n"


def test_gptlab_sample_options(tiny_run, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", str(tiny_run), "--max-new-tokens", "8", "--temperature", "0", "--dtype", "bfloat16",
                 "--repetition-penalty", "1.3", "--num-samples", "2"]) == 0
    first, second = capsys.readouterr().out.split("\n---\n")
    assert len(first) == 8 + 1 and first == second  # 8 characters and a newline; greedy: samples agree
    assert main(["sample", str(tiny_run), "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "gptlab sample: error: temperature" in err and "Traceback" not in err


@pytest.mark.parametrize("option, value", [("--temperature", "1e-45"), ("--temperature", "5e-324"),
                                           ("--top-p", "5e-324"), ("--repetition-penalty", "5e-324")])
def test_gptlab_sample_takes_extreme_values(tiny_run, capsys: pytest.CaptureFixture, option: str, value: str) -> None:
    assert main(["sample", str(tiny_run), "--max-new-tokens", "10", "--seed", "0", option, value]) == 0
    out = capsys.readouterr()
    assert len(out.out) == 10 + 1 and "Traceback" not in out.err
