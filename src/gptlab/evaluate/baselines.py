"""Kneser-Ney n-gram baselines scored on exactly the targets a transformer is scored on."""

from __future__ import annotations

import numpy as np

from ..data import TokenDataset
from ..errors import GptlabError
from ..tokenizers import Tokenizer
from .ngram import KneserNey, NGramCounts
from .scorer import Score, text_lengths


def score_ngram(lm: KneserNey, tokenizer: Tokenizer, tokens: np.ndarray) -> Score:
    """The n-gram's `Score` on the same targets t_1 .. t_{N-1} as `scorer.score`."""
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
