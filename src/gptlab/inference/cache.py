"""The engine's KV cache: one slot per running sequence, rows of different lengths, within a byte budget.

All keys and values live in one tensor of shape (n_layer, 2, slots, n_head, capacity, head_dim). Slot
r holds the r-th running sequence's keys and values at positions 0 .. length-1, so sequences of any
lengths decode together: a decoding step writes each row's new key at that row's own length and
masks every key past it. The engine keeps its running sequences in slots 0 .. n-1 (a sequence that
leaves is replaced by the last one, a copy of that one row), so a step reads the slots as one view
and never gathers or copies the cache. The buffer grows when more or longer sequences run (at most
`budget_bytes`) and is freed when the engine goes idle.

This is vLLM's PagedAttention idea at the granularity of whole sequences: paging finer than that would
need an attention kernel that reads pages in place, which torch's CPU kernels do not offer; gathering
pages into one tensor every step would copy the whole cache per step.

A step sees the cache through the model's cache protocol: `positions(T)` gives the position ids of the
T new tokens and `layer(i).update(k, v)` stores this call's keys and values and returns every key and
value the queries may see, with a mask (None: plain causal).
"""

from __future__ import annotations

import torch

from ..config import GPTConfig


class SlotCache:
    def __init__(self, config: GPTConfig, *, device: torch.device, dtype: torch.dtype,
                 budget_bytes: int | None = None, max_slots: int | None = None) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots  # the most sequences that will ever run at once (the engine's max_batch)
        # keys and values of one position in every layer
        self.bytes_per_position = 2 * config.n_layer * config.n_embd * torch.empty((), dtype=dtype).element_size()
        self.kv: torch.Tensor | None = None  # (L, 2, slots, nh, capacity, hs)

    @property
    def slots(self) -> int:
        return 0 if self.kv is None else self.kv.size(2)

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.size(4)

    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes

    def fits(self, slots: int, capacity: int) -> bool:
        """Whether `slots` sequences of `capacity` positions stay within the budget."""
        return self.budget_bytes is None or slots * capacity * self.bytes_per_position <= self.budget_bytes

    def ensure(self, slots: int, capacity: int, *, ahead: bool = False) -> None:
        """Make room for `slots` sequences of `capacity` positions, keeping what the slots hold.

        With `ahead`, a dimension that must grow doubles (within the budget, `capacity`'s block size and
        `max_slots`), so that sequences joining one by one cost a copy of the cache only a few times, not
        each time. Slots past `max_slots` would never be used, and zero-filling them is not free: a 16th
        sequence joining 15 once grew a GPT-2 cache to 30 slots, 557 MB, in 1.45 s.
        """
        if slots <= self.slots and capacity <= self.capacity:
            return
        want_slots, want_capacity = max(slots, self.slots), max(capacity, self.capacity)
        if ahead:  # only what must grow grows ahead: each costs a zero-fill and a copy of the whole cache
            grown_slots = want_slots if slots <= self.slots else \
                max(want_slots, min(2 * want_slots, self.max_slots or 2 * want_slots))
            grown_capacity = want_capacity if capacity <= self.capacity else \
                min(self.config.block_size, max(want_capacity, 2 * self.capacity))
            if self.fits(grown_slots, grown_capacity):
                want_slots, want_capacity = grown_slots, grown_capacity
        c = self.config
        # zeros, not empty: a masked key still meets its value in the weighted sum (0 * NaN is NaN)
        kv = torch.zeros((c.n_layer, 2, want_slots, c.n_head, want_capacity, c.head_dim),
                         device=self.device, dtype=self.dtype)
        if self.kv is not None:
            kv[:, :, :self.slots, :, :self.capacity].copy_(self.kv)
        self.kv = kv

    def release(self) -> None:
        """Give the memory back (the engine has nothing running)."""
        self.kv = None

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target`."""
        if length:
            self.kv[:, :, target, :, :length].copy_(self.kv[:, :, source, :, :length])

    def decode(self, lengths: list[int]) -> DecodeStep:
        """The cache as slots 0 .. len(lengths)-1 see it for one new token each, slot r at lengths[r]."""
        return DecodeStep(self, lengths)

    def prefill(self, start: int, rows: int) -> PrefillStep:
        """The cache for slots start .. start+rows-1 reading their windows from position 0."""
        return PrefillStep(self, start, rows)


class DecodeStep:
    """One new token per row, each at its own length: rows that are all as long need no mask."""

    def __init__(self, cache: SlotCache, lengths: list[int]) -> None:
        self.kv = cache.kv
        self.rows = len(lengths)
        longest, shortest = max(lengths), min(lengths)
        self.seen = longest + 1  # keys the longest row's query sees
        device = cache.device
        if longest == shortest:
            self.uniform: int | None = longest
            self._positions = torch.tensor([longest], device=device)  # (1,)
            self.mask: torch.Tensor | None = None  # one query per row sees every key before it
        else:
            self.uniform = None
            self._lengths = torch.tensor(lengths, device=device)  # (B,)
            self._row_index = torch.arange(self.rows, device=device)  # (B,)
            self._positions = self._lengths[:, None]  # (B, 1)
            keys = torch.arange(self.seen, device=device)  # (S,)
            self.mask = (keys <= self._lengths[:, None])[:, None, None, :]  # (B, 1, 1, S): True = may attend

    def positions(self, T: int) -> torch.Tensor:
        assert T == 1, "a decoding step feeds one token per row"
        return self._positions

    def layer(self, i: int) -> _DecodeLayer:
        return _DecodeLayer(self, i)


class _DecodeLayer:
    def __init__(self, step: DecodeStep, i: int) -> None:
        self.step = step
        self.i = i

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        step = self.step
        keys, values = step.kv[self.i, 0, :step.rows], step.kv[self.i, 1, :step.rows]  # (B, nh, capacity, hs)
        if step.uniform is not None:
            keys[:, :, step.uniform:step.uniform + 1] = k
            values[:, :, step.uniform:step.uniform + 1] = v
        else:  # row b's key goes to position lengths[b]
            keys[step._row_index, :, step._lengths] = k[:, :, 0]  # (B, nh, hs)
            values[step._row_index, :, step._lengths] = v[:, :, 0]
        return keys[:, :, :step.seen], values[:, :, :step.seen], step.mask  # (B, nh, S, hs)


class PrefillStep:
    """Whole windows from position 0, right-padded to one length: causal attention over this call's
    keys is exact for every real position (a real query never sees the padding after it)."""

    def __init__(self, cache: SlotCache, start: int, rows: int) -> None:
        self.kv = cache.kv
        self.start, self.end = start, start + rows
        self.device = cache.device

    def positions(self, T: int) -> torch.Tensor:
        return torch.arange(T, device=self.device)  # (T,)

    def layer(self, i: int) -> _PrefillLayer:
        return _PrefillLayer(self, i)


class _PrefillLayer:
    def __init__(self, step: PrefillStep, i: int) -> None:
        self.step = step
        self.i = i

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        step, T = self.step, k.size(2)
        step.kv[self.i, 0, step.start:step.end, :, :T] = k
        step.kv[self.i, 1, step.start:step.end, :, :T] = v
        return k, v, None  # (B, nh, T, hs): the queries see exactly this call's keys, causally
