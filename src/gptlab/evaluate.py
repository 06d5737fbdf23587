"""How good is a language model: loss over a whole text, perplexity, and bits per token/char/byte.

A token stream t_0 .. t_{N-1} is scored on its predictions of t_1 .. t_{N-1}: t_0 has no context, and
every model (transformer or n-gram) is scored on exactly these tokens, so their numbers compare. A
stream longer than the context is read through a sliding window: each window scores only the tokens
no earlier window scored, so every token is scored once, with at least `context - stride + 1` tokens
of context (the first window's tokens with whatever precedes them).

Bits per character and per byte divide the same total by the length of the scored tokens' decoded
text, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_pretrained
from .data import TokenDataset
from .errors import GptlabError
from .model import GPT
from .ngram import KneserNey, NGramCounts
from .tokenizers import CharTokenizer, Tokenizer

LN2 = math.log(2)


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
    """What makes two tokenizers the same: the name and, for characters, which character each id is."""
    if isinstance(tokenizer, CharTokenizer):
        return (tokenizer.name, tuple(tokenizer.chars))
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


@torch.no_grad()
def score_tokens(
    model: GPT,
    tokens: np.ndarray,
    *,
    stride: int | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """(total nll in nats, number of scored tokens) of `model` on the stream `tokens`.

    Windows as `resolve_window` says; `batch_size` windows per forward pass, by default as many as
    keep the logits near 128 MiB.
    """
    context, stride = resolve_window(model, context, stride)
    batch_size = batch_size or min(64, max(1, 2**25 // (context * model.config.vocab_size)))
    tokens = np.asarray(tokens)
    if len(tokens) < 2:
        raise GptlabError(f"the text has {len(tokens)} token(s); scoring needs at least 2")
    was_training = model.training
    model.eval()
    try:
        scored = [_score_batch(model, tokens, batch, device)
                  for batch in _batches(windows(len(tokens), context, stride), batch_size)]
    finally:
        model.train(was_training)
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
    logits = model(x).logits.float()  # (B, L, V)
    nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, L)
    # target j of a window is t[begin + 1 + j]; it is new from position `first`
    firsts = torch.tensor([first - begin - 1 for begin, first, _ in batch], device=nll.device)  # (B,)
    new = torch.arange(length, device=nll.device)[None, :] >= firsts[:, None]  # (B, L)
    return float(nll[new].double().sum()), int(new.sum())


def score(
    model: GPT,
    tokenizer: Tokenizer,
    tokens: np.ndarray,
    *,
    stride: int | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> Score:
    """The model's `Score` on a token stream (targets t_1 .. t_{N-1})."""
    nll, count = score_tokens(model, tokens, stride=stride, context=context, batch_size=batch_size, device=device)
    chars, n_bytes = text_lengths(tokenizer, np.asarray(tokens[1:]))
    return Score(nll, count, chars, n_bytes)


def describe(tokenizer: Tokenizer) -> str:
    unit = "characters" if tokenizer.name == "char" else "tokens"
    return f"{tokenizer.name}, {tokenizer.vocab_size:,} {unit}"


def check_tokenizers(model_tokenizer: Tokenizer, data_tokenizer: Tokenizer, model_name: str, data_name: str) -> None:
    if signature(model_tokenizer) != signature(data_tokenizer):
        raise GptlabError(
            f"the tokenizer of {model_name} ({describe(model_tokenizer)}) does not match the one {data_name} "
            f"was prepared with ({describe(data_tokenizer)}); evaluate on data prepared with the model's "
            "tokenizer, or pass --text FILE"
        )


@dataclass
class EvalInput:
    """A model, its tokenizer, and the token stream to score it on (with where it came from)."""

    model: GPT
    tokenizer: Tokenizer
    tokens: np.ndarray
    source: str


def load_eval_input(
    model_path: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    text: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> EvalInput:
    """Load the model and the tokens of `data`'s split or of the text file `text`, refusing mismatches."""
    if (data is None) == (text is None):
        raise GptlabError("give exactly one of --data DATA_DIR and --text FILE")
    model, tokenizer = load_pretrained(model_path, device)
    if data is not None:
        dataset = TokenDataset(data)
        check_tokenizers(tokenizer, dataset.tokenizer, str(model_path), str(data))
        return EvalInput(model, tokenizer, dataset.split(split), f"{data} ({split} split)")
    path = Path(text)
    if not path.is_file():
        raise GptlabError(f"--text {text}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GptlabError(f"--text {text}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    return EvalInput(model, tokenizer, np.asarray(tokenizer.encode(content), dtype=np.int64), str(path))


def score_ngram(lm: KneserNey, tokenizer: Tokenizer, tokens: np.ndarray) -> Score:
    """The n-gram's `Score` on the same targets t_1 .. t_{N-1} as `score`."""
    if len(tokens) < 2:
        raise GptlabError(f"the text has {len(tokens)} token(s); scoring needs at least 2")
    nll = -float(lm.log_probs(np.asarray(tokens)).sum())
    chars, n_bytes = text_lengths(tokenizer, np.asarray(tokens[1:]))
    return Score(nll, len(tokens) - 1, chars, n_bytes)


def ngram_scores(dataset: TokenDataset, max_order: int, split: str = "val") -> dict[int, Score]:
    """Kneser-Ney models of orders 1 .. max_order fitted on the train split, scored on `split`."""
    counts = NGramCounts(dataset.split("train"), dataset.tokenizer.vocab_size, max_order)
    tokens = dataset.split(split)
    return {order: score_ngram(KneserNey(counts, order), dataset.tokenizer, tokens) for order in range(1, max_order + 1)}


def baseline_rows(scores: dict[int, Score]) -> list[tuple[str, Score]]:
    """Unigram, bigram and the best order, chosen on the scored split itself (so a little optimistic)."""
    rows = [(f"{order}-gram (Kneser-Ney)", scores[order]) for order in (1, 2) if order in scores]
    best = min(scores, key=lambda order: scores[order].nll)
    rows.append((f"best n-gram of orders 1-{max(scores)}: {best}-gram", scores[best]))
    return rows


def markdown_table(rows: list[tuple[str, Score]]) -> str:
    lines = [
        "| model | loss (nats/token) | perplexity | bits/token | bits/char | bits/byte | tokens scored |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in rows:
        lines.append(
            f"| {name} | {s.loss:.4f} | {s.perplexity:.2f} | {s.bits_per_token:.4f} | {s.bits_per_char:.4f} "
            f"| {s.bits_per_byte:.4f} | {s.tokens:,} |"
        )
    return "\n".join(lines)


@dataclass
class Evaluation:
    """A model's score on one token stream, and optionally n-gram baselines' on the same tokens."""

    source: str
    context: int
    stride: int
    model: Score
    baselines: dict[int, Score]

    def rows(self, model_name: str = "this model") -> list[tuple[str, Score]]:
        return [(model_name, self.model), *(baseline_rows(self.baselines) if self.baselines else [])]

    def to_dict(self) -> dict:
        return {
            "source": self.source, "context": self.context, "stride": self.stride, "model": self.model.to_dict(),
            "baselines": {f"{order}-gram": s.to_dict() for order, s in self.baselines.items()},
        }


def evaluate_model(
    model_path: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    text: str | Path | None = None,
    stride: int | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    baseline_order: int = 0,
) -> Evaluation:
    """Score a model on a data split or a text file; with `baseline_order`, n-grams of orders 1 .. it too."""
    if baseline_order and data is None:
        raise GptlabError("--baselines needs --data DATA_DIR: the n-grams are fitted on its train split")
    loaded = load_eval_input(model_path, data=data, split=split, text=text, device=device)
    context, stride = resolve_window(loaded.model, context, stride)
    model_score = score(loaded.model, loaded.tokenizer, loaded.tokens, stride=stride, context=context,
                        batch_size=batch_size, device=device)
    baselines = ngram_scores(TokenDataset(data), baseline_order, split) if baseline_order else {}
    return Evaluation(loaded.source, context, stride, model_score, baselines)
