"""Interpolated Kneser-Ney n-gram language models, the baseline a transformer has to beat.

Kneser & Ney (1995), interpolated as in Chen & Goodman (1998), with one absolute discount per order:

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .)  +  D_k * N_k(h .) / c_k(h .) * P_{k-1}(w | h')

where h' is h without its oldest token, c_k(h .) sums c_k(h v) over v, N_k(h .) counts the v with
c_k(h v) > 0, and P_0 is uniform over the vocabulary (so an unseen token keeps some probability). The
highest order counts occurrences; every lower order counts *continuations*, the number of distinct
tokens seen just before the k-gram, which is Kneser-Ney's idea: "Francisco" is frequent but follows
almost only "San", so as a fallback it should be rare. A context never seen at order k backs off to
P_{k-1} entirely. D_k = n1 / (n1 + 2 n2), from the k-grams counted once and twice.

Everything is counted with numpy over whole arrays: a k-gram is one int64 key, the id of its
(k-1)-gram prefix times the vocabulary size plus its last token, so each order is one `np.unique` over
the stream and each lookup one `np.searchsorted`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import GptlabError

MAX_ORDER = 12


def _lookup(keys: np.ndarray, context_ids: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The index in `keys` of each k-gram (context id, token), or -1 where it was never seen."""
    wanted = context_ids * vocab_size + tokens
    at = np.searchsorted(keys, wanted)
    found = (at < len(keys)) & (context_ids >= 0)
    found[found] = keys[at[found]] == wanted[found]
    return np.where(found, at, -1)


class NGramCounts:
    """Occurrence and continuation counts of every k-gram of one token stream, k = 1 .. max_order.

    `keys[k]` is sorted; `keys[k] // vocab_size` is the index of the k-gram's prefix in `keys[k - 1]`
    (`keys[0]` is the empty context, index 0) and `keys[k] % vocab_size` its last token.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int, max_order: int) -> None:
        if not 1 <= max_order <= MAX_ORDER:
            raise GptlabError(f"the n-gram order must be between 1 and {MAX_ORDER}, got {max_order}")
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) < max_order:
            raise GptlabError(f"{len(tokens)} training tokens are too few for an order-{max_order} model")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise GptlabError(f"token ids must be in [0, {vocab_size}); the data does not match its vocabulary")
        self.vocab_size = vocab_size
        self.max_order = max_order
        self.keys: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.occurrences: list[np.ndarray] = [np.array([len(tokens)], dtype=np.int64)]
        self.continuations: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # [k] defined for k < max_order
        ids = np.zeros(len(tokens), dtype=np.int64)  # the (k-1)-gram ending at each position; -1: none
        for k in range(1, max_order + 1):
            # the k-gram ending at i is the (k-1)-gram ending at i-1, then t_i; it exists for i >= k-1
            prefix = ids[k - 2 : -1] if k > 1 else ids
            keys, first, inverse, counts = np.unique(
                prefix * vocab_size + tokens[k - 1 :], return_index=True, return_inverse=True, return_counts=True
            )
            if k > 1:
                # each distinct k-gram is one left extension of its (k-1)-gram suffix, the one ending at
                # the same position: counting them gives the (k-1)-grams' continuation counts
                suffix = ids[k - 1 + first]
                self.continuations.append(np.bincount(suffix, minlength=len(self.keys[k - 1])))
            self.keys.append(keys)
            self.occurrences.append(counts)
            ids = np.full(len(tokens), -1, dtype=np.int64)
            ids[k - 1 :] = inverse.reshape(-1)

    def ids(self, tokens: np.ndarray, order: int) -> list[np.ndarray]:
        """For k = 0 .. order, the index in `keys[k]` of the k-gram of `tokens` ending at each position."""
        tokens = np.asarray(tokens, dtype=np.int64)
        levels = [np.zeros(len(tokens), dtype=np.int64)]
        for k in range(1, order + 1):
            prefix = np.full(len(tokens), -1, dtype=np.int64)
            if k == 1:
                prefix[:] = 0
            else:
                prefix[1:] = levels[k - 1][:-1]
            levels.append(_lookup(self.keys[k], prefix, tokens, self.vocab_size))
        return levels


class KneserNey:
    """An interpolated Kneser-Ney model of one order over shared `NGramCounts`."""

    def __init__(self, counts: NGramCounts, order: int, discounts: Sequence[float] | None = None) -> None:
        if not 1 <= order <= counts.max_order:
            raise GptlabError(f"order {order} is outside the counted orders 1..{counts.max_order}")
        if discounts is not None and len(discounts) != order:
            raise ValueError(f"need {order} discounts, one per order, got {len(discounts)}")
        self.counts = counts
        self.order = order
        self.vocab_size = counts.vocab_size
        # per order k: the counts it uses, and per context their total and how many are non-zero
        self.used: list[np.ndarray] = [np.zeros(0)]
        self.totals: list[np.ndarray] = [np.zeros(0)]
        self.types: list[np.ndarray] = [np.zeros(0)]
        self.discounts: list[float] = [0.0]
        for k in range(1, order + 1):
            used = counts.occurrences[k] if k == order else counts.continuations[k]
            context = counts.keys[k] // self.vocab_size
            n_contexts = len(counts.keys[k - 1])
            self.used.append(used)
            self.totals.append(np.bincount(context, weights=used, minlength=n_contexts))
            self.types.append(np.bincount(context[used > 0], minlength=n_contexts))
            self.discounts.append(discounts[k - 1] if discounts is not None else _discount(used))

    def _interpolate(
        self, k: int, context: np.ndarray, count: np.ndarray, lower: np.ndarray
    ) -> np.ndarray:
        """P_k from P_{k-1} (`lower`), elementwise; a context of total 0 (or -1, unseen) backs off."""
        seen = context >= 0
        total = np.where(seen, self.totals[k][np.maximum(context, 0)], 0.0)
        types = np.where(seen, self.types[k][np.maximum(context, 0)], 0)
        d = self.discounts[k]
        safe = np.where(total > 0, total, 1.0)
        p = (np.maximum(count - d, 0.0) + d * types * lower) / safe
        return np.where(total > 0, p, lower)

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """ln P(t_i | the up to order-1 tokens before it) for i = 1 .. N-1 of a token stream."""
        tokens = np.asarray(tokens, dtype=np.int64)
        ids = self.counts.ids(tokens, self.order)
        p = np.full(len(tokens) - 1, 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            context = ids[k - 1][:-1]  # the (k-1)-gram just before each target
            found = ids[k][1:]
            count = np.where(found >= 0, self.used[k][np.maximum(found, 0)], 0)
            p = self._interpolate(k, context, count, p)
        return np.log(p)

    def next_distribution(self, history: Sequence[int]) -> np.ndarray:
        """P(w | history) for every w in the vocabulary, (vocab_size,)."""
        history = np.asarray(history, dtype=np.int64)[max(0, len(history) - self.order + 1) :]  # what the model reads
        ids = self.counts.ids(history, self.order - 1)
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            context = ids[k - 1][-1] if len(history) else (0 if k == 1 else -1)
            count = np.zeros(self.vocab_size)
            if context >= 0:
                keys = self.counts.keys[k]
                lo, hi = np.searchsorted(keys, [context * self.vocab_size, (context + 1) * self.vocab_size])
                count[keys[lo:hi] - context * self.vocab_size] = self.used[k][lo:hi]
            p = self._interpolate(k, np.full(self.vocab_size, context), count, p)
        return p

    def sample(self, prompt: Sequence[int], n_tokens: int, rng: np.random.Generator) -> list[int]:
        """`n_tokens` new tokens drawn one at a time from `next_distribution`."""
        history = list(prompt)
        out = []
        for _ in range(n_tokens):
            cumulative = np.cumsum(self.next_distribution(history))
            token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
            token = min(token, self.vocab_size - 1)
            history.append(token)
            out.append(token)
        return out


def _discount(counts: np.ndarray) -> float:
    """Ney, Essen & Kneser's estimate n1 / (n1 + 2 n2); 0.5 when nothing is seen once."""
    n1 = int(np.count_nonzero(counts == 1))
    n2 = int(np.count_nonzero(counts == 2))
    return n1 / (n1 + 2 * n2) if n1 else 0.5
