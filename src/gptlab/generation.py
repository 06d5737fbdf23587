"""Sampling from a trained GPT: the decoding loop with its KV cache, sampling controls and streaming.

The public surface is `SamplingParams` (what to generate), `complete` (a batch of prompts to finished
`Completion`s), `TextStream` (one prompt, decoded text as it arrives) and `generate` (token ids in,
token ids out; `gptlab.generate`).

Context window: the model sees at most `block_size` tokens. A longer prompt is cut to its last
`block_size` tokens. When generation fills the window, the window slides: the context restarts from its
last `block_size // 2` tokens and grows again one token per step. Positional embeddings are learned and
absolute, so a token's keys and values change with its position; sliding therefore recomputes them for
the new window (one prefill pass) instead of shifting the cache. Every step's logits are exactly those
of the uncached model on that step's window, and the uncached path (`use_cache=False`) slides by the
same rule, so both give the same tokens at any length.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import GPTConfig
from .model import GPT


class KVCache:
    """Every layer's keys and values, allocated once for a whole generation, filled slot by slot.

    Generation then costs one position per new token instead of the whole context. Rows of a batch
    may be left-padded so that prompts of different lengths decode together: row b's first `pad[b]`
    slots hold no token, no query attends to them, and positions count from the row's first real
    token, so each row computes what it would compute alone. It is the model's `Cache`: a forward pass
    calls `positions` and each layer's `update`; `advance` then commits the new slots.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, capacity: int, *,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 1 <= capacity <= config.block_size:
            raise ValueError(f"cache capacity must be in [1, {config.block_size}], got {capacity}")
        shape = (config.n_layer, batch_size, config.n_head, capacity, config.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (L, B, nh, S, hs)
        self.values = torch.empty(shape, device=device, dtype=dtype)  # (L, B, nh, S, hs)
        self.length = 0  # slots filled so far, the same for every row
        self.pad: torch.Tensor | None = None  # (B,) padding slots per row; None when no row is padded
        self._pending = 0  # tokens of the forward pass in progress
        self._mask: torch.Tensor | None = None  # its attention mask
        self._slots = torch.arange(capacity, device=device)  # (S,)
        self._key_valid: torch.Tensor | None = None  # (B, 1, 1, S): False on padding slots

    @property
    def capacity(self) -> int:
        return self.keys.size(3)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Empty the cache for new rows, row b starting with `pad[b]` padding slots."""
        self.length = 0
        self.pad = pad if pad is not None and bool(pad.any()) else None
        if self.pad is None:
            self._key_valid = None
        else:
            self._key_valid = (self._slots >= self.pad[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (e.g. sequences that finished), keeping the others' contents."""
        length = self.length
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        self.reset(None if self.pad is None else self.pad.index_select(0, rows))
        self.length = length

    def positions(self, T: int) -> torch.Tensor:
        """Begin a forward pass of T tokens: their position ids, (T,) when no row is padded, else (B, T)."""
        if self.length + T > self.capacity:
            raise ValueError(f"{T} more tokens overflow the cache ({self.length}/{self.capacity} slots used)")
        self._pending = T
        self._mask = self._attention_mask(T)
        slots = self._slots[self.length : self.length + T]  # (T,)
        if self.pad is None:
            return slots
        return (slots - self.pad[:, None]).clamp_(min=0)  # (B, T); padding slots get position 0

    def layer(self, index: int) -> _LayerSlots:
        return _LayerSlots(self, index)

    def advance(self) -> None:
        """Commit the slots the forward pass just filled."""
        self.length += self._pending
        self._pending, self._mask = 0, None

    def _attention_mask(self, T: int) -> torch.Tensor | None:
        """Which cached keys each of the next T queries may see; None when the causal rule suffices."""
        start, end = self.length, self.length + T
        if self.pad is None:
            return None  # queries at the end of the keys: the model's default causal rule
        if T == 1:
            return self._key_valid[..., :end]  # (B, 1, 1, end): a view, nothing allocated per step
        query, key = self._slots[start:end, None], self._slots[:end]
        causal = key <= query  # (T, end)
        # a padding query may see itself only, so that its softmax row is never empty (NaN)
        return (self._key_valid[..., :end] & causal) | (key == query)  # (B, 1, T, end)


class _LayerSlots:
    """One layer's view of a KVCache: writes this pass's keys and values after the cached ones."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cache = self.cache
        start, end = cache.length, cache.length + k.size(-2)
        keys, values = cache.keys[self.index], cache.values[self.index]  # (B, nh, S, hs) views into the buffers
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end], cache._mask


@dataclass
class SamplingParams:
    """How to continue a prompt. `validate()` raises ValueError naming the first invalid field."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 is greedy
    top_k: int | None = None  # sample among the k most likely tokens only
    top_p: float | None = None  # sample within the smallest set of tokens whose mass reaches top_p
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int | None = None  # same seed, same text on every run; None uses torch's global RNG
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text, left out of the result
    stop_at_eos: bool = True  # stop at the tokenizer's eos_id when it has one

    def validate(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None), got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is none), got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) (or None), got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    text: str  # the generated text only, without the prompt, the eos token or the stop string
    token_ids: list[int]  # every generated id, including the eos or the tokens that spelled the stop string
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_new_tokens reached)
    prompt_tokens: int


def complete(
    model: GPT, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams
) -> list[Completion]:
    """Continue every prompt in one batch; each row's tokens are those it would get alone."""
    run = _Generation(model, tokenizer, prompts, params)
    pieces: list[list[str]] = [[] for _ in prompts]
    for row, piece in run.events():
        pieces[row].append(piece)
    return [
        Completion("".join(text), ids, reason, len(prompt))
        for text, ids, reason, prompt in zip(pieces, run.token_ids, run.finish_reasons, prompts)
    ]


class TextStream:
    """Iterate to receive the decoded text of one prompt's continuation piece by piece, as it arrives.

    A piece is always whole characters (bytes of a character split across tokens wait for the rest)
    and never part of a possible stop string. Once exhausted, `finish_reason` is "stop" or "length";
    `close()` ends generation early and leaves it None.
    """

    def __init__(self, model: GPT, tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self._run = _Generation(model, tokenizer, [prompt_ids], params)
        self._events = self._run.events()
        self.prompt_tokens = len(prompt_ids)

    @property
    def finish_reason(self) -> str | None:
        return self._run.finish_reasons[0]

    @property
    def completion_tokens(self) -> int:
        return len(self._run.token_ids[0])

    @property
    def token_ids(self) -> list[int]:
        return self._run.token_ids[0]

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        _, piece = next(self._events)
        return piece

    def close(self) -> None:
        self._events.close()


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + max_new_tokens), with no stop condition but the length."""
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    params.validate()
    prompts = idx.tolist()
    _check_prompts(prompts, model.config.vocab_size)
    new: list[list[int]] = []
    with _eval_mode(model):
        if max_new_tokens:
            decoder = _Decoder(model, prompts, max_new_tokens, use_cache)
            sampler = _Sampler(params, prompts, model.config.vocab_size, decoder.device, [generator] * len(prompts))
            for step in range(max_new_tokens):
                tokens = sampler(decoder.logits)
                new.append(tokens)
                if step + 1 < max_new_tokens:
                    decoder.advance(tokens)
    out = torch.tensor(new, dtype=idx.dtype, device=idx.device).reshape(max_new_tokens, idx.size(0))
    return torch.cat([idx, out.t()], dim=1)


def slide_window(window: list[int], block_size: int) -> list[int]:
    """The context that replaces a `window` grown past block_size: its last block_size // 2 tokens."""
    return window[-max(block_size // 2, 1):]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask to -inf every token outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the top token always stays
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): make every seen token less likely, whatever its logit's sign."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)  # (B, V)


class _Decoder:
    """Feeds rows of token ids through the model and holds each row's next-token logits.

    With the cache a step costs one position per row; without it every step recomputes the whole
    window, which is the baseline the cache is measured against. Both slide windows by one rule.
    """

    def __init__(self, model: GPT, prompts: list[list[int]], max_new_tokens: int, use_cache: bool) -> None:
        self.model = model
        self.block_size = model.config.block_size
        self.use_cache = use_cache
        self.windows = [list(p[-self.block_size:]) for p in prompts]
        # the last token is never fed back, so the longest row needs len + max_new_tokens - 1 slots
        capacity = min(self.block_size, max(map(len, self.windows)) + max_new_tokens - 1)
        weight = model.transformer.wpe.weight  # float in every model, int8-quantized ones too: the cache's dtype
        self.device = weight.device
        self.cache = KVCache(model.config, len(prompts), capacity, device=weight.device, dtype=weight.dtype)
        self.logits = self._prefill()  # (B, V)

    def _prefill(self) -> torch.Tensor:
        """Left-pad the windows to one length and run them through an emptied cache."""
        longest = max(map(len, self.windows))
        pad = [longest - len(w) for w in self.windows]
        rows = [[0] * n + w for n, w in zip(pad, self.windows)]
        self.cache.reset(torch.tensor(pad, device=self.device))
        return self._forward(torch.tensor(rows, device=self.device))

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens that follow the cache -> (B, V) logits of the last one; only it needs the head."""
        h = self.model.hidden_states(idx, self.cache)  # (B, T, C)
        self.cache.advance()
        return self.model.lm_head(h[:, -1])  # (B, V)

    def advance(self, tokens: list[int]) -> None:
        """Append one token to every row and compute the logits that follow it."""
        for window, token in zip(self.windows, tokens):
            window.append(token)
        if self.use_cache and self.cache.length < self.cache.capacity:
            idx = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
            self.logits = self._forward(idx)
        else:
            self.windows = [w if len(w) <= self.block_size else slide_window(w, self.block_size) for w in self.windows]
            self.logits = self._prefill()

    def keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.device)
        self.windows = [self.windows[r] for r in rows]
        self.cache.keep_rows(index)
        self.logits = self.logits.index_select(0, index)


class _Sampler:
    """(B, V) logits -> one token per row, under one SamplingParams; each row draws from its own RNG."""

    def __init__(
        self, params: SamplingParams, prompts: list[list[int]], vocab_size: int, device: torch.device,
        generators: list[torch.Generator | None],
    ) -> None:
        self.params = params
        self.generators = generators
        self.seen: torch.Tensor | None = None  # (B, V): which tokens the repetition penalty applies to
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, prompt] = True

    def __call__(self, logits: torch.Tensor) -> list[int]:
        p = self.params
        logits = logits.float()  # (B, V)
        if self.seen is not None:
            logits = penalize_repetition(logits, self.seen, p.repetition_penalty)
        if p.temperature == 0:
            tokens = logits.argmax(dim=-1)  # (B,)
        else:
            probs = F.softmax(filter_logits(logits / p.temperature, p.top_k, p.top_p), dim=-1)  # (B, V)
            tokens = torch.cat([
                torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)
            ])  # (B,)
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
        return tokens.tolist()

    def keep_rows(self, rows: list[int]) -> None:
        self.generators = [self.generators[r] for r in rows]
        if self.seen is not None:
            self.seen = self.seen[rows]


class _TextTracker:
    """One row's decoded text, released only as whole characters that cannot begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded, not yet released: it may be the start of a stop string

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to release, and whether a stop string completed."""
        self.held += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release()

    def flush(self) -> str:
        """The end of the text: held text, and U+FFFD for the bytes of a character left incomplete."""
        self.held += self.decoder.decode(b"", final=True)
        piece, stopped = self._release()
        return piece if stopped else piece + self._take(len(self.held))

    def _release(self) -> tuple[str, bool]:
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            piece, self.held = self.held[:min(found)], ""
            return piece, True
        return self._take(len(self.held) - self._stop_prefix_length()), False

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that some stop string starts with."""
        longest = min(len(self.held), max((len(s) - 1 for s in self.stop), default=0))
        for n in range(longest, 0, -1):
            if any(s.startswith(self.held[-n:]) for s in self.stop):
                return n
        return 0

    def _take(self, n: int) -> str:
        piece, self.held = self.held[:n], self.held[n:]
        return piece


class _Generation:
    """One batch of prompts generated to the end: the loop shared by `complete` and `TextStream`."""

    def __init__(self, model: GPT, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        params.validate()
        self.prompts = [list(p) for p in prompts]
        _check_prompts(self.prompts, model.config.vocab_size)
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[list[int]] = [[] for _ in self.prompts]
        self.finish_reasons: list[str | None] = [None] * len(self.prompts)

    @torch.inference_mode()
    def events(self) -> Iterator[tuple[int, str]]:
        """Yield (row, text piece) as text is released; rows that finish leave the batch."""
        p = self.params
        if p.max_new_tokens == 0:
            self.finish_reasons = ["length"] * len(self.prompts)
            return
        with _eval_mode(self.model):
            decoder = _Decoder(self.model, self.prompts, p.max_new_tokens, use_cache=True)
            generators = [_row_generator(p.seed, decoder.device) for _ in self.prompts]
            sampler = _Sampler(p, self.prompts, self.model.config.vocab_size, decoder.device, generators)
            texts = [_TextTracker(self.tokenizer, p.stop) for _ in self.prompts]
            eos = self.tokenizer.eos_id if p.stop_at_eos else None
            rows = list(range(len(self.prompts)))  # the prompt index of each live row
            while True:
                tokens = sampler(decoder.logits)
                alive: list[int] = []
                for i, (row, token) in enumerate(zip(rows, tokens)):
                    self.token_ids[row].append(token)
                    if token == eos:
                        piece, reason = texts[row].flush(), "stop"
                    else:
                        piece, stopped = texts[row].push(token)
                        reason = "stop" if stopped else None
                        if reason is None and len(self.token_ids[row]) == p.max_new_tokens:
                            piece, reason = piece + texts[row].flush(), "length"
                    if piece:
                        yield row, piece
                    if reason is None:
                        alive.append(i)
                    else:
                        self.finish_reasons[row] = reason
                if not alive:
                    return
                if len(alive) < len(rows):
                    rows, tokens = [rows[i] for i in alive], [tokens[i] for i in alive]
                    decoder.keep_rows(alive)
                    sampler.keep_rows(alive)
                decoder.advance(tokens)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Generate without dropout, then give the model back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _row_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("no prompts: pass at least one list of token ids")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: start it with at least one token (e.g. the eos id)")
        bad = next((t for t in prompt if not _is_int(t) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i} holds {bad!r}, not a token id in [0, {vocab_size})")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
