"""The one scorer: the negative log-likelihood a model gives to chosen target tokens.

Training's periodic estimate, the run report, `gptlab eval`, the lm-evaluation-harness model and the
benchmarks all score through `token_nll`, so they agree to the last bit on the same inputs. It runs the
transformer once over the inputs, then the LM head only at the positions whose loss is taken (at
GPT-2's vocabulary the head is the largest matrix, and a sliding window scores only part of each
window), a block of rows at a time, so the (rows, vocabulary) logits stay small however many positions
are scored, and takes the cross-entropy on those 2-D logits directly: the (B, V, T) layout that
`cross_entropy(logits.transpose(1, 2), y)` needs is a strided read that measured 3x slower.

A token stream t_0 .. t_{N-1} is scored on its predictions of t_1 .. t_{N-1}: t_0 has no context, and
every model (transformer or n-gram) is scored on exactly these tokens, so their numbers compare. A
stream longer than the context is read through a sliding window: each window scores only the tokens
no earlier window scored, so every token is scored once, with at least `context - stride + 1` tokens
of context (the first window's tokens with whatever precedes them).

Bits per character and per byte divide the same total by the length of the scored tokens' decoded
text, which makes models with different tokenizers comparable.

On a CPU the batches' thread count follows their measured times (`gptlab.threads`; a busy machine can
make two threads several times slower than one); GPTLAB_ADAPT_THREADS=0 keeps torch's setting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import GptlabError
from ..inference.modes import eval_mode
from ..model import GPT
from ..threads import ThreadTuner, inference_adapts
from ..tokenizers import BPETokenizer, CharTokenizer, Tokenizer

logger = logging.getLogger("gptlab.evaluate")

LN2 = math.log(2)
# Logits are computed for this many (row x vocabulary) entries at a time: 2**22 float32 logits are
# 16 MiB, 83 rows at GPT-2's vocabulary, which stay in cache between the head's product and the
# cross-entropy. benchmarks/scorer.py measured 2**20 to 2**26 on 2 cores: 2**20 re-reads the head's
# matrix too often (50-65% of the forward pass's throughput), 2**24 and 2**26 spill (59-74%), 2**22 86-96%.
LOGIT_BLOCK = 2**22


def token_nll(
    model: GPT, idx: torch.Tensor, targets: torch.Tensor, where: torch.Tensor | None = None, *, greedy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """-ln P(targets[b, t] | idx[b, :t+1]) at the positions where `where` is True (all when None).

    idx and targets are (B, T), `where` a (B, T) bool mask; the result is (N,) float32, N scored
    positions in row-major order. With `greedy`, also an (N,) bool: whether the target is the model's
    most likely token there (what lm-eval calls `is_greedy`). Call it under `torch.no_grad()`; the
    caller sets eval mode and any autocast.
    """
    h = model.hidden_states(idx)  # (B, T, C)
    if where is None:
        h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (N, C), (N,)
    else:
        h, targets = h[where], targets[where]  # (N, C), (N,)
    rows = max(1, LOGIT_BLOCK // model.config.vocab_size)
    nll = torch.empty(len(targets), dtype=torch.float32, device=h.device)  # (N,)
    hits = torch.empty(len(targets), dtype=torch.bool, device=h.device) if greedy else None  # (N,)
    for i in range(0, len(targets), rows):
        logits = model.lm_head(h[i : i + rows]).float()  # (rows, V)
        nll[i : i + rows] = F.cross_entropy(logits, targets[i : i + rows], reduction="none")
        if hits is not None:
            hits[i : i + rows] = logits.argmax(-1) == targets[i : i + rows]
    return (nll, hits) if hits is not None else nll


@dataclass
class Score:
    """Total negative log-likelihood of the scored tokens, and what they decode to."""

    nll: float  # nats, summed over the scored tokens
    tokens: int
    chars: int
    bytes: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy, nats per token."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_token(self) -> float:
        return self.nll / LN2 / self.tokens

    @property
    def bits_per_char(self) -> float:
        return self.nll / LN2 / self.chars

    @property
    def bits_per_byte(self) -> float:
        return self.nll / LN2 / self.bytes

    def to_dict(self) -> dict[str, float | int]:
        metrics = ("loss", "perplexity", "bits_per_token", "bits_per_char", "bits_per_byte")
        return {**asdict(self), **{name: getattr(self, name) for name in metrics}}


def text_lengths(tokenizer: Tokenizer, tokens: np.ndarray) -> tuple[int, int]:
    """(characters, bytes) of the decoded text of `tokens`, counted per token without decoding it all.

    A character is counted at its UTF-8 lead byte (any byte but 10xxxxxx), so a character whose bytes
    are split across BPE tokens is counted once, in the token holding its first byte.
    """
    table = _length_table(tokenizer)  # (vocab, 2): bytes, lead bytes of each token
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=len(table))[: len(table)]
    n_bytes, n_chars = (counts[:, None] * table).sum(axis=0)
    return int(n_chars), int(n_bytes)


_LENGTH_TABLES: dict[tuple, np.ndarray] = {}


def _length_table(tokenizer: Tokenizer) -> np.ndarray:
    """Per token id: its byte length and its count of UTF-8 lead bytes (built once per vocabulary)."""
    key = signature(tokenizer)
    if key not in _LENGTH_TABLES:
        raw = [tokenizer.decode_bytes([token]) for token in range(tokenizer.vocab_size)]
        _LENGTH_TABLES[key] = np.array([(len(b), sum((x & 0xC0) != 0x80 for x in b)) for b in raw], dtype=np.int64)
    return _LENGTH_TABLES[key]


def signature(tokenizer: Tokenizer) -> tuple:
    """What makes two tokenizers the same: the name and, for characters or a trained BPE, which token each id is."""
    if isinstance(tokenizer, CharTokenizer):
        return (tokenizer.name, tuple(tokenizer.chars))
    if isinstance(tokenizer, BPETokenizer):
        return (tokenizer.name, tokenizer.fingerprint())
    return (tokenizer.name, tokenizer.vocab_size)


def resolve_window(model: GPT, context: int | None, stride: int | None) -> tuple[int, int]:
    """`context` defaults to the model's; `stride` to half of it, a fair trade between context (every
    token after the first window sees at least half a context) and cost (twice a disjoint reading)."""
    context = context or model.config.block_size
    if context > model.config.block_size:
        raise GptlabError(f"--context {context} exceeds the model's context of {model.config.block_size}")
    return context, stride or max(1, context // 2)


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, first, end) per window: inputs t[begin:end], targets t[begin+1:end+1], of which the
    ones at positions first..end are new. Each target 1..n_tokens-1 is new in exactly one window."""
    if context < 1 or not 1 <= stride <= context:
        raise GptlabError(f"--stride must be between 1 and the context ({context}), got {stride}")
    scored = 0  # the last target position scored so far
    while scored < n_tokens - 1:
        end = min(scored + (context if scored == 0 else stride), n_tokens - 1)
        yield max(0, end - context), scored + 1, end
        scored = end


def default_batch_size(model: GPT, context: int) -> int:
    """Windows per forward pass: as many as keep one (B, T, C) activation near 32 MiB, at most 64."""
    return min(64, max(1, 2**23 // (context * model.config.n_embd)))


@torch.no_grad()
def score_tokens(
    model: GPT,
    tokens: np.ndarray,
    *,
    stride: int | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> tuple[float, int]:
    """(total nll in nats, number of scored tokens) of `model` on the stream `tokens`.

    Windows as `resolve_window` says, `batch_size` windows per forward pass (`default_batch_size`).
    `progress` shows a bar of tokens scored on stderr; None shows it only on a terminal.
    """
    context, stride = resolve_window(model, context, stride)
    batch_size = batch_size or default_batch_size(model, context)
    tokens = np.asarray(tokens)
    if len(tokens) < 2:
        raise GptlabError(f"the text has {len(tokens)} token(s); scoring needs at least 2")
    scored = []
    threads = ThreadTuner(inference_adapts(device), logger.info, name="scoring threads")
    try:
        with eval_mode(model), tqdm(total=len(tokens) - 1, desc="scoring", unit="tok", unit_scale=True,
                                    leave=False, disable=None if progress is None else not progress) as bar:
            for batch in _batches(windows(len(tokens), context, stride), batch_size):
                threads.before_step(shape=(len(batch), batch[0][2] - batch[0][0]))
                started = time.perf_counter()
                scored.append(_score_batch(model, tokens, batch, device))
                threads.after_step(time.perf_counter() - started)
                bar.update(scored[-1][1])
    finally:
        threads.restore()
    return sum(nll for nll, _ in scored), sum(count for _, count in scored)


def _batches(
    spans: Iterator[tuple[int, int, int]], batch_size: int
) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows grouped up to `batch_size`, a group holding windows of one length only."""
    batch: list[tuple[int, int, int]] = []
    for span in spans:
        if batch and (span[2] - span[0] != batch[0][2] - batch[0][0] or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def _score_batch(
    model: GPT, tokens: np.ndarray, batch: list[tuple[int, int, int]], device: torch.device | str
) -> tuple[float, int]:
    """Windows of one length, stacked: (B, L) inputs, loss summed over each window's new targets."""
    length = batch[0][2] - batch[0][0]
    begins = np.array([begin for begin, _, _ in batch])
    rows = np.asarray(tokens[begins[:, None] + np.arange(length + 1)], dtype=np.int64)  # (B, L+1)
    x = torch.from_numpy(rows[:, :-1]).to(device)  # (B, L)
    y = torch.from_numpy(rows[:, 1:]).to(device)  # (B, L)
    # target j of a window is t[begin + 1 + j]; it is new from position `first`
    firsts = torch.tensor([first - begin - 1 for begin, first, _ in batch], device=x.device)  # (B,)
    new = torch.arange(length, device=x.device)[None, :] >= firsts[:, None]  # (B, L)
    nll = token_nll(model, x, y, new)  # (N,)
    return float(nll.double().sum()), int(new.sum())


def score(
    model: GPT,
    tokenizer: Tokenizer,
    tokens: np.ndarray,
    *,
    stride: int | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> Score:
    """The model's `Score` on a token stream (targets t_1 .. t_{N-1})."""
    nll, count = score_tokens(model, tokens, stride=stride, context=context, batch_size=batch_size,
                              device=device, progress=progress)
    chars, n_bytes = text_lengths(tokenizer, np.asarray(tokens[1:]))
    return Score(nll, count, chars, n_bytes)
