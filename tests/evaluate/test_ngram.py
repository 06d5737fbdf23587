"""Interpolated Kneser-Ney: a hand-computed example, normalisation, and the two code paths agreeing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.errors import GptlabError
from gptlab.evaluate.ngram import KneserNey, NGramCounts

A, B, C = 0, 1, 2
# "a b a b c a b": bigrams ab x3, ba, bc, ca; trigrams aba, bab, abc, bca, cab
STREAM = np.array([A, B, A, B, C, A, B])


def model(order: int, discounts: list[float] | None = None) -> KneserNey:
    return KneserNey(NGramCounts(STREAM, 3, 3), order, discounts)


def test_unigram_by_hand() -> None:
    """Occurrences a:3 b:3 c:1 of 7; D = 0.5, 3 types: P(w) = (c(w) - 0.5 + 0.5 * 3 / 3) / 7."""
    p = model(1, [0.5]).next_distribution([])
    assert p == pytest.approx([3 / 7, 3 / 7, 1 / 7])


def test_bigram_by_hand() -> None:
    """Continuation counts a:2 (after b, c), b:1, c:1 of 4, so with D = 0.5 the lower order is
    P1 = (N(.w) - 0.5 + 0.5 * 3 / 3) / 4 = [1/2, 1/4, 1/4].
    After a (ab x3; total 3, 1 type): P(b|a) = (3 - 0.5 + 0.5 * 1 * 1/4) / 3 = 0.875,
    P(a|a) = 0.5 * 1/2 / 3 = 1/12, P(c|a) = 0.5 * 1/4 / 3 = 1/24.
    After b (ba, bc; total 2, 2 types): P(a|b) = (0.5 + 1 * 1/2) / 2 = 1/2, P(b|b) = 1/4 / 2 = 1/8,
    P(c|b) = (0.5 + 1/4) / 2 = 3/8."""
    lm = model(2, [0.5, 0.5])
    assert lm.next_distribution([A]) == pytest.approx([1 / 12, 0.875, 1 / 24])
    assert lm.next_distribution([B]) == pytest.approx([1 / 2, 1 / 8, 3 / 8])
    assert lm.next_distribution([]) == pytest.approx([1 / 2, 1 / 4, 1 / 4])  # no context: P1


def test_trigram_by_hand() -> None:
    """Bigram continuation counts: ab 2 (bab, cab), ba 1, bc 1, ca 1.
    Middle order after b (ba 1, bc 1; total 2, 2 types): P2(a|b) = (0.5 + 1/2) / 2 = 1/2,
    P2(b|b) = 1/4 / 2 = 1/8, P2(c|b) = (0.5 + 1/4) / 2 = 3/8.
    Top order after "a b" (aba, abc; total 2, 2 types): P(a|ab) = (0.5 + 1 * 1/2) / 2 = 1/2,
    P(b|ab) = 1/8 / 2 = 1/16, P(c|ab) = (0.5 + 3/8) / 2 = 7/16.
    "c c" was never seen: back off to the middle order after c (ca 1; total 1, 1 type):
    P2(a|c) = 0.5 + 0.5 * 1/2 = 3/4, P2(b|c) = 0.5 * 1/4 = 1/8, P2(c|c) = 1/8."""
    lm = model(3, [0.5, 0.5, 0.5])
    assert lm.next_distribution([A, B]) == pytest.approx([1 / 2, 1 / 16, 7 / 16])
    assert lm.next_distribution([C, C]) == pytest.approx([3 / 4, 1 / 8, 1 / 8])
    # the vectorised scorer agrees: ln P(c | a b) for the stream "a b c"
    assert lm.log_probs(np.array([A, B, C]))[1] == pytest.approx(np.log(7 / 16))


def test_discounts_are_n1_over_n1_plus_2n2() -> None:
    """Trigram model: top order counts 5 trigrams once (D = 1); bigram continuations 1,1,1,2
    (n1 3, n2 1: D = 3/5); unigram continuations a:2 b:1 c:1 (n1 2, n2 1: D = 1/2)."""
    assert model(3).discounts[1:] == pytest.approx([1 / 2, 3 / 5, 1.0])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.integers(2, 40),
    length=st.integers(6, 400),
    order=st.integers(1, 6),
)
def test_probabilities_sum_to_one_for_random_contexts(seed: int, vocab: int, length: int, order: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=length)
    lm = KneserNey(NGramCounts(tokens, vocab, order), order)
    contexts = [rng.integers(0, vocab, size=rng.integers(0, 8)) for _ in range(5)]
    contexts.append(tokens[: rng.integers(0, length)])  # contexts that were seen in training
    for context in contexts:
        p = lm.next_distribution(context)
        assert p.shape == (vocab,) and (p > 0).all()
        assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_the_vectorised_scorer_matches_one_context_at_a_time() -> None:
    rng = np.random.default_rng(0)
    counts = NGramCounts(rng.integers(0, 6, size=300), 6, 5)
    stream = rng.integers(0, 6, size=60)
    for order in range(1, 6):
        lm = KneserNey(counts, order)
        one_by_one = [np.log(lm.next_distribution(stream[:i])[stream[i]]) for i in range(1, len(stream))]
        assert lm.log_probs(stream) == pytest.approx(one_by_one, abs=1e-12)


def test_higher_orders_learn_a_deterministic_pattern() -> None:
    stream = np.tile([A, B, C, C], 50)  # after "c c" always a; after "b" always c
    counts = NGramCounts(stream, 3, 3)
    unigram, trigram = KneserNey(counts, 1), KneserNey(counts, 3)
    assert -trigram.log_probs(stream).mean() < 0.1 < -unigram.log_probs(stream).mean()
    rule = {(A, B): C, (B, C): C, (C, C): A, (C, A): B}
    for (x, y), z in rule.items():
        assert trigram.next_distribution([x, y])[z] > 0.99
    sample = [A, B, *trigram.sample([A, B], 400, np.random.default_rng(0))]
    followed = [rule[(x, y)] == z for x, y, z in zip(sample, sample[1:], sample[2:]) if (x, y) in rule]
    assert len(followed) > 300 and np.mean(followed) > 0.97


def test_sampling_is_reproducible_and_in_the_vocabulary() -> None:
    lm = KneserNey(NGramCounts(np.random.default_rng(1).integers(0, 9, 500), 9, 4), 4)
    first = lm.sample([], 50, np.random.default_rng(7))
    assert first == lm.sample([], 50, np.random.default_rng(7))
    assert all(0 <= t < 9 for t in first) and len(first) == 50


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(GptlabError, match="n-gram order must be between"):
        NGramCounts(STREAM, 3, 0)
    with pytest.raises(GptlabError, match="token ids must be in"):
        NGramCounts(np.array([0, 1, 5]), 3, 2)
    with pytest.raises(GptlabError, match="too few"):
        NGramCounts(np.array([0, 1]), 3, 3)




def test_cli_scores_and_samples(char_data: Path, gptlab) -> None:
    code, out, err = gptlab("ngram", "--data", str(char_data), "--order", "4", "--sample-tokens", "40", "--prompt", "All")
    assert code == 0, err
    assert "| 4-gram |" in out
    sample = out.split("--- sample ---\n")[1].rstrip("\n")
    assert sample.startswith("All") and len(sample) == len("All") + 40
    meta = json.loads((char_data / "meta.json").read_text())
    as_json = json.loads(gptlab("ngram", "--data", str(char_data), "--order", "4", "--json")[1])
    assert as_json["tokens"] == meta["val_tokens"] - 1
    assert as_json["perplexity"] == pytest.approx(np.exp(as_json["loss"]))


def test_cli_refuses_an_order_out_of_range(char_data: Path, gptlab) -> None:
    code, _, err = gptlab("ngram", "--data", str(char_data), "--order", "0")
    assert code == 2 and "--order must be between" in err
