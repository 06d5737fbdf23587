"""The inference engine: one loop owns the model and advances every running sequence in one batch.

Continuous batching, as Orca's iteration-level scheduling (Yu et al., OSDI 2022), vLLM and TGI do it.
Each `step()`:

1. sequences that were cancelled leave the batch (and their cache slots);
2. waiting sequences join, first come first served, while the batch has room (`max_batch`), the
   KV cache stays within its byte budget, and this step's prefill stays within `prefill_tokens`
   (at least one joins whenever there is room, so a long prompt cannot wait forever);
3. one batched forward pass decodes one token for every sequence that has its window cached, and a
   second one reads the windows of those that joined (or whose window just slid), right-padded
   to one length; only the last position of each row goes through the LM head, unless the
   sequence asked for its prompt's log-probabilities;
4. one sampler call picks every row's next token under that row's own parameters and generator;
5. each sequence takes its token (text, stop strings, eos, length); those that finished leave at once.

A request that cannot be served fails alone: if a step raises, each of its sequences steps again
alone, and only those that fail alone fail, each with its own error (`_isolate`). The step's thread
count follows measurement on a CPU (`gptlab.threads`).

So a request waits at most for the step in progress and then its own prefill, whatever else runs; a
streamed and a non-streamed request, greedy and sampled rows, seeded and unseeded ones share every
step; and a row's tokens are those it would get alone (the sampler and the cache are per row).

Context window: the model sees at most `block_size` tokens. A longer prompt is cut to its last
`block_size` tokens. When generation fills the window, the window slides: the context restarts from
its last `block_size // 2` tokens and grows again. GPT-2's positions are learned and absolute, so a
token's keys and values change with its position; sliding therefore reads the new window again (one
prefill) instead of shifting the cache. Every step's logits are those of the uncached model on that
step's window, and `use_cache=False` (every step reads its whole window again) slides by the same
rule, so both give the same tokens at any length.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence as Seq

import torch

from ..errors import failure_cause
from ..kernels import release_scratch
from ..model import GPT
from ..threads import ThreadTuner, inference_adapts
from .cache import SlotCache
from .modes import eval_mode
from .params import SamplingParams, _is_int
from .sampler import Sampler, TokenLogprobs, logprobs_of
from .text import TextTracker

logger = logging.getLogger("gptlab.inference")

PREFILL_TOKENS = 2048  # prompt tokens read per step, beyond the first sequence that joins


def slide_window(window: list[int], block_size: int) -> list[int]:
    """The context that replaces a `window` grown past block_size: its last block_size // 2 tokens."""
    return window[-max(block_size // 2, 1):]


class Sequence:
    """One request inside the engine: what the model sees, what it generated, and how it ended.

    Consumers read `pieces` (released text, in order), `token_ids`, `logprobs` and `prompt_logprobs`
    as they grow; `done` says nothing more will come: `finish_reason` is then "stop" or "length", or
    None for a sequence that was cancelled or failed (`error`).
    """

    def __init__(self, prompt: list[int], params: SamplingParams, *, block_size: int, tokenizer,
                 generator: torch.Generator | None, stop_ids: frozenset[int]) -> None:
        self.prompt = prompt
        self.params = params
        self.generator = generator
        self.stop_ids = stop_ids
        self.window = prompt[-block_size:]  # what the model sees
        self.cached = 0  # tokens of the window whose keys and values are in the cache
        # positions it may hold in the cache; the last token is never fed back
        self.reservation = min(block_size, len(self.window) + max(params.max_new_tokens - 1, 0))
        self.text = None if tokenizer is None else TextTracker(tokenizer, params.stop)
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprobs] | None = None if params.logprobs is None else []
        self.prompt_logprobs: list[TokenLogprobs] | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def text_so_far(self) -> str:
        return "".join(self.pieces)

    def add(self, token: int, logprobs: TokenLogprobs | None) -> None:
        """Take the next token: its text, and whether it ends the sequence."""
        self.token_ids.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        reason = None
        if token in self.stop_ids:
            piece, reason = (self.text.flush() if self.text else ""), "stop"
        else:
            piece, stopped = self.text.push(token) if self.text else ("", False)
            if stopped:
                reason = "stop"
            elif len(self.token_ids) == self.params.max_new_tokens:
                piece, reason = piece + (self.text.flush() if self.text else ""), "length"
        if piece:
            self.pieces.append(piece)
        if reason:
            self.finish(reason)

    def finish(self, reason: str | None, error: BaseException | None = None) -> None:
        self.finish_reason, self.error, self.done = reason, error, True


class Engine:
    """Owns the model for as long as it runs: submit sequences, call `step()` until none is left.

    Not thread-safe: one thread submits, cancels and steps (the server's engine thread does all three).
    """

    def __init__(self, model: GPT, tokenizer=None, *, max_batch: int = 16, kv_cache_bytes: int | None = None,
                 use_cache: bool = True, grow_ahead: bool = False, prefill_tokens: int | None = PREFILL_TOKENS,
                 adapt_threads: bool | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch = max_batch
        self.use_cache = use_cache
        self.grow_ahead = grow_ahead
        self.prefill_tokens = prefill_tokens
        weight = model.transformer.wpe.weight  # float in every model, int8-quantized ones too: device and dtype
        self.device = weight.device
        self.cache = SlotCache(model.config, device=weight.device, dtype=weight.dtype, budget_bytes=kv_cache_bytes,
                               max_slots=max_batch)
        self.sampler = Sampler(model.config.vocab_size, max_batch, weight.device)
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # the running batch; rows[r] holds cache slot r
        self._eos = None if tokenizer is None else tokenizer.eos_id
        self._cancelled = False
        self.steps = 0  # forward steps run, for the server's statistics
        # the decoding steps' thread count follows their measured times (gptlab.threads); None: the default
        adapt = inference_adapts(self.device) if adapt_threads is None else adapt_threads and self.device.type == "cpu"
        self.threads = ThreadTuner(adapt, logger.info, name="inference threads")

    def warm_up_plan(self) -> list[tuple[int, int]]:
        """(batch size, thread count) pairs whose kernels a decoding step measures, the most needed first:
        batch size 1 at torch's thread count (where the first request starts), then the other thread
        counts the steps may take, then 2, 4, ... up to max_batch (`gptlab.kernels` rounds rows up to a
        power of two)."""
        sizes = [1]
        while sizes[-1] < self.max_batch:
            sizes.append(min(2 * sizes[-1], self.max_batch))
        now = torch.get_num_threads()
        counts = [now] + [n for n in self.threads.counts if n != now]
        return [(rows, count) for rows in sizes for count in counts]

    def warm_up(self, plan: Seq[tuple[int, int]] | None = None) -> None:
        """Run one forward pass of each (batch size, thread count) of `plan` (None: `warm_up_plan()`), so
        that the kernels' one-time measurements of those shapes (`gptlab.kernels`, cached on disk per
        machine) happen now and not under a request. A server measures the first pair before it listens
        and the others while it waits for requests (serve/engine_thread.py)."""
        with torch.inference_mode(), eval_mode(self.model):
            for rows, count in self.warm_up_plan() if plan is None else plan:
                if torch.get_num_threads() != count:
                    torch.set_num_threads(count)
                self.model(torch.zeros((rows, 1), dtype=torch.long, device=self.device))  # (B, 1)
        self.threads.restore()

    # -- requests -----------------------------------------------------------------------------------

    def check(self, prompt: Seq[int], params: SamplingParams, name: str = "the prompt") -> None:
        """Raise ValueError if this engine cannot run the request; touches no state (any thread)."""
        params.validate()
        params.check_ids(self.config.vocab_size)
        if not prompt:
            raise ValueError(f"{name} is empty: start it with at least one token (e.g. the eos id)")
        bad = next((t for t in prompt if not _is_int(t) or not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name} holds {bad!r}, not a token id in [0, {self.config.vocab_size})")
        window = min(len(prompt), self.config.block_size)
        need = min(self.config.block_size, window + max(params.max_new_tokens - 1, 0))
        if not self.cache.fits(1, need):
            mib = need * self.cache.bytes_per_position / 2**20
            raise ValueError(f"the request needs {mib:.1f} MiB of KV cache ({need} positions), more than the "
                             f"cache's budget of {self.cache.budget_bytes / 2**20:.1f} MiB")

    def submit(self, prompt: Seq[int], params: SamplingParams, *, generator: torch.Generator | None = None
               ) -> Sequence:
        """Queue a request; `generator` (shared by rows that pass the same one) overrides params.seed."""
        self.check(prompt, params)
        if generator is None and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids)
        if params.stop_at_eos and self._eos is not None:
            stop_ids.add(self._eos)
        seq = Sequence(list(prompt), params, block_size=self.config.block_size, tokenizer=self.tokenizer,
                       generator=generator, stop_ids=frozenset(stop_ids))
        if params.max_new_tokens == 0 and params.prompt_logprobs is None:
            seq.finish("length")  # nothing to compute
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence: it leaves the batch (or the queue) at the start of the next step."""
        if not seq.done:
            seq.cancelled = True
            seq.finish(None)
            self._cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def run(self) -> None:
        """Step until every submitted sequence is done."""
        while self.busy:
            self.step()

    # -- one iteration ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Advance every running sequence by one token; returns the sequences that changed."""
        with eval_mode(self.model):
            if self._cancelled:
                self._drop_cancelled()
            generators = self._generator_states()
            try:
                self._prefills_last()
                self._admit()  # allocates the cache, which can fail too
                rows = list(self.rows)
                if not rows:
                    self._idle()
                    return []
                prefill = any(s.cached == 0 for s in rows)
                self.threads.before_step(shape=(len(rows), prefill))
                started = time.perf_counter()
                tokens, entries = self._decode(rows)
                self.threads.after_step(time.perf_counter() - started)
                isolated = False
            except Exception as exc:  # noqa: BLE001 - which sequence caused it is found below
                rows = list(self.rows)
                tokens, entries = self._isolate(rows, exc, generators)
                isolated = True
            self.steps += 1
            self._advance(rows, tokens, entries)
            for r in reversed(range(len(self.rows))):
                if self.rows[r].done:
                    self._remove(r)
            if isolated:  # each row ran alone in slot 0: every window is read again, the penalties rebuilt
                for r, seq in enumerate(self.rows):
                    seq.cached = 0
                    self.sampler.join(r, seq)
            if not self.busy:
                self._idle()
            return rows

    def _decode(self, rows: list[Sequence]) -> tuple[list[int | None], dict[int, TokenLogprobs]]:
        """One forward pass and one sampler call for `rows` (slots 0 .. len(rows)-1): each row's next
        token, and the log-probabilities of the rows that asked for them, by row."""
        logits = self._forward(rows)  # (B, V)
        tokens = self.sampler(logits, rows)  # (B,)
        wanted = [r for r, s in enumerate(rows) if s.logprobs is not None]
        entries = dict(zip(wanted, logprobs_of(logits[wanted], tokens[wanted],
                                               [rows[r].params.logprobs for r in wanted]))) if wanted else {}
        return tokens.tolist(), entries

    def _isolate(self, rows: list[Sequence], exc: Exception, generators: list
                 ) -> tuple[list[int | None], dict[int, TokenLogprobs]]:
        """The batch's step failed: step each sequence alone, so that only those that fail alone fail
        (with their own error) and the others take their token as if nothing had happened.

        Each runs in slot 0 reading its whole window (a prefill gives the logits a cached decode would),
        its penalty state rebuilt from its tokens and its generator rewound to where the step began, so
        a greedy or seeded row gets the token it would have got in the batch. The cache's contents are
        then stale, so every surviving row reads its window again at the next step (`step`)."""
        logger.warning("a generation step of %d sequence(s) failed (%s); stepping each alone", len(rows),
                       failure_cause(exc))
        for generator, state in generators:
            generator.set_state(state)
        tokens: list[int | None] = []
        entries: dict[int, TokenLogprobs] = {}
        for r, seq in enumerate(rows):
            try:
                seq.cached = 0
                self.cache.ensure(1, seq.reservation)
                self.sampler.join(0, seq)
                (token,), alone = self._decode([seq])
            except Exception as own:  # noqa: BLE001 - this sequence cannot be served; it fails alone
                logger.error("a sequence failed: %s", failure_cause(own), exc_info=own)
                seq.finish(None, own)
                tokens.append(None)
                continue
            tokens.append(token)
            if 0 in alone:
                entries[r] = alone[0]
        return tokens, entries

    def _generator_states(self) -> list[tuple[torch.Generator, torch.Tensor]]:
        """Where the running and joining rows' generators stand, to rewind them if the step fails."""
        rows = self.rows + list(itertools.islice(self.waiting, self.max_batch))
        unique = {id(s.generator): s.generator for s in rows if s.generator is not None}
        return [(g, g.get_state()) for g in unique.values()]

    def _forward(self, rows: list[Sequence]) -> torch.Tensor:
        """One batched decode for the rows with cached windows, one batched prefill for the others."""
        model, device = self.model, self.device
        first = next((r for r, s in enumerate(rows) if s.cached == 0), len(rows))  # prefill rows come last
        parts = []
        if first:
            step = self.cache.decode([s.cached for s in rows[:first]])
            idx = torch.tensor([[s.window[-1]] for s in rows[:first]], device=device)  # (B, 1)
            h = model.hidden_states(idx, cache=step)  # (B, 1, C)
            parts.append(model.lm_head(h[:, -1]))  # (B, V)
            for s in rows[:first]:
                s.cached += 1
        if first < len(rows):
            fresh = rows[first:]
            lengths = [len(s.window) for s in fresh]
            T = max(lengths)
            idx = torch.tensor([s.window + [0] * (T - len(s.window)) for s in fresh], device=device)  # (B', T)
            h = model.hidden_states(idx, cache=self.cache.prefill(first, len(fresh)))  # (B', T, C)
            if min(lengths) == T:
                last = h[:, -1]
            else:
                last = h[torch.arange(len(fresh), device=device), torch.tensor(lengths, device=device) - 1]
            parts.append(model.lm_head(last))  # (B', V)
            for j, s in enumerate(fresh):
                if s.params.prompt_logprobs is not None and s.prompt_logprobs is None:
                    s.prompt_logprobs = self._prompt_logprobs(h[j, :lengths[j]], s)
                s.cached = len(s.window)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prompt_logprobs(self, h: torch.Tensor, seq: Sequence) -> list[TokenLogprobs]:
        """(T, C) hidden states of a window -> each token's log-probability given the ones before it."""
        window = torch.tensor(seq.window, device=self.device)
        entries = logprobs_of(self.model.lm_head(h[:-1]), window[1:], [seq.params.prompt_logprobs] * (len(window) - 1))
        return [TokenLogprobs(seq.window[0], None, {})] + entries

    def _advance(self, rows: list[Sequence], tokens: list[int | None], entries: dict[int, TokenLogprobs]) -> None:
        block = self.config.block_size
        for r, (seq, token) in enumerate(zip(rows, tokens)):
            if seq.done:  # it failed alone (`_isolate`)
                continue
            if seq.params.max_new_tokens == 0:  # it only wanted its prompt's log-probabilities
                seq.finish("length")
                continue
            try:
                seq.add(token, entries.get(r))
            except Exception as exc:  # e.g. an id the tokenizer cannot decode: this sequence fails, not the batch
                logger.error("a sequence failed: %s", failure_cause(exc), exc_info=exc)
                seq.finish(None, exc)
            if seq.done:
                continue
            seq.window.append(token)
            if len(seq.window) > block:
                seq.window, seq.cached = slide_window(seq.window, block), 0
            elif not self.use_cache:
                seq.cached = 0

    # -- the batch's slots --------------------------------------------------------------------------

    def _admit(self) -> None:
        capacity = max((s.reservation for s in self.rows), default=0)
        joined: list[int] = []
        tokens = 0
        while self.waiting and len(self.rows) < self.max_batch:
            seq = self.waiting[0]
            need = max(capacity, seq.reservation)
            if not self.cache.fits(len(self.rows) + 1, need):
                break
            if joined and self.prefill_tokens is not None and tokens + len(seq.window) > self.prefill_tokens:
                break
            self.waiting.popleft()
            capacity, tokens = need, tokens + len(seq.window)
            joined.append(len(self.rows))
            self.rows.append(seq)
        if joined:
            self.cache.ensure(len(self.rows), capacity, ahead=self.grow_ahead)
            for slot in joined:
                self.sampler.join(slot, self.rows[slot])

    def _prefills_last(self) -> None:
        """Move the rows that must read their window again (slid, or no cache) behind those that decode,
        so that each forward pass reads one contiguous range of slots."""
        rows = self.rows
        i, j = 0, len(rows) - 1
        while True:
            while i < j and rows[i].cached:
                i += 1
            while j > i and not rows[j].cached:
                j -= 1
            if i >= j:
                return
            # rows[i] reads its window again, so only rows[j]'s cache needs to move
            self.cache.move(j, i, rows[j].cached)
            self.sampler.swap(i, j)
            rows[i], rows[j] = rows[j], rows[i]

    def _remove(self, r: int) -> None:
        """Free slot r: the last row moves into it (a copy of that row only)."""
        last = len(self.rows) - 1
        if r != last:
            self.cache.move(last, r, self.rows[last].cached)
            self.sampler.move(last, r)
            self.rows[r] = self.rows[last]
        self.rows.pop()

    def _drop_cancelled(self) -> None:
        self._cancelled = False
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for r in reversed(range(len(self.rows))):
            if self.rows[r].cancelled:
                self._remove(r)

    def _idle(self) -> None:
        if not self.rows:
            self.cache.release()
            self.sampler.release()
            self.threads.restore()
            release_scratch()  # the kernels' measurement copies (new shapes are measured in the first steps)
