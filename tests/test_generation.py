"""Generation: the KV cache against the plain model, batching, every sampling control, streaming, the CLI.

The reference everywhere is `GPT.forward` on the whole context (no cache, all logits), written out
in the test so that it does not share code with the decoding loop it checks.
"""

from __future__ import annotations

import math
import string
import sys

import pytest
import torch

from conftest import tiny_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.generation import (
    Completion, KVCache, SamplingParams, TextStream, _Decoder, _Sampler, complete, filter_logits, generate,
    penalize_repetition,
)
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


def generate_from_logits(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """The frequency of each token in n draws by the sampler from the same (1, V) logits."""
    g = torch.Generator().manual_seed(0)
    sampler = _Sampler(params, [[0]] * n, logits.size(-1), torch.device("cpu"), [g] * n)
    draws = torch.tensor(sampler(logits.expand(n, -1)))
    return torch.bincount(draws, minlength=logits.size(-1)) / n


# --- the KV cache --------------------------------------------------------------------------------


def cached_step(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """(B, T) tokens after the cache's contents -> (B, V) logits of the last one, as decoding runs it."""
    h = model.hidden_states(idx, cache)
    cache.advance()
    return model.lm_head(h[:, -1])


def test_cached_logits_match_the_uncached_model_over_the_whole_context() -> None:
    model = tiny_model(block_size=16)
    seq = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    expected = model(seq).logits  # (B, T, V)
    cache = KVCache(model.config, 3, 16)
    with torch.inference_mode():
        got = [cached_step(model, seq[:, :5], cache)]  # a 5-token prefill, then one token per step
        got += [cached_step(model, seq[:, t : t + 1], cache) for t in range(5, 16)]
    torch.testing.assert_close(torch.stack(got, 1), expected[:, 4:], rtol=0, atol=1e-5)
    assert cache.length == 16


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
    with torch.inference_mode():
        decoder = _Decoder(model, [prompt], steps, use_cache=True)
        tokens, logits = [], []
        for _ in range(steps):
            logits.append(decoder.logits[0].clone())
            tokens.append(int(decoder.logits[0].argmax()))
            decoder.advance(tokens[-1:])
    assert tokens == expected_tokens
    torch.testing.assert_close(torch.stack(logits), torch.stack(expected_logits), rtol=0, atol=1e-5)
    assert generate(model, torch.tensor([prompt]), steps, temperature=0, use_cache=False)[0, 20:].tolist() == tokens


def test_cache_memory_is_two_tensors_of_the_used_context() -> None:
    model = tiny_model(block_size=64)
    decoder = _Decoder(model, prompts_of([10, 7, 3]), max_new_tokens=20, use_cache=True)
    c = model.config
    T = 10 + 20 - 1  # the last token is never fed back
    assert decoder.cache.nbytes() == 2 * c.n_layer * 3 * T * c.n_embd * 4


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


# --- batching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=7)])
def test_batched_prompts_of_different_lengths_equal_one_by_one(sampling: dict) -> None:
    model = tiny_model(block_size=16)
    prompts = prompts_of([1, 4, 9, 13, 16])
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False, **sampling)  # 13 + 20 > 16: windows slide
    batched = complete(model, CHARS, prompts, params)
    alone = [complete(model, CHARS, [p], params)[0] for p in prompts]
    assert batched == alone
    assert all(len(c.token_ids) == 20 and c.finish_reason == "length" for c in batched)


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
    draws = generate_from_logits(logits, SamplingParams(temperature=0.5), n=20_000)
    expected = torch.softmax(logits[0] / 0.5, -1)
    torch.testing.assert_close(draws, expected, rtol=0, atol=0.015)


def test_top_k_keeps_the_k_most_likely_tokens() -> None:
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, -1.0]])
    kept = filter_logits(logits, top_k=2, top_p=None).isfinite()[0].tolist()
    assert kept == [False, True, False, True, False]
    draws = generate_from_logits(logits, SamplingParams(temperature=1.0, top_k=2), n=4000)
    assert set(draws.nonzero().flatten().tolist()) == {1, 3}


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    assert filter_logits(logits, None, 0.5).isfinite()[0].tolist() == [False, True, False, False]
    assert filter_logits(logits, None, 0.8).isfinite()[0].tolist() == [False, True, True, False]
    assert filter_logits(logits, None, 0.81).isfinite()[0].tolist() == [False, True, True, True]
    assert filter_logits(logits, None, 1.0).isfinite().all()


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


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


# --- streaming -----------------------------------------------------------------------------------


class Scripted(GPT):
    """A GPT-2-vocabulary model whose greedy continuation is a fixed script, to force token splits."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=1, n_embd=4))
        self.script = script
        self.calls = 0
        self.lm_head = torch.nn.Identity()  # hidden_states already yields the logits

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
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


def test_bfloat16_generation_runs_with_a_bfloat16_cache() -> None:
    model = tiny_model().to(torch.bfloat16)
    decoder = _Decoder(model, [[1, 2, 3]], 5, use_cache=True)
    assert decoder.cache.keys.dtype == torch.bfloat16
    out = complete(model, CHARS, [[1, 2, 3]], SamplingParams(max_new_tokens=5, seed=0))[0]
    assert len(out.token_ids) == 5


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
