"""The baselines a fine-tuned classifier is compared with, and the one scorer of every classifier, on made-up
data whose answer is known."""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest

from gptlab.errors import GptlabError
from gptlab.data.labeled import classification
from gptlab.evaluate.text_classifiers import (TEXT_CLASSIFIERS, baselines, fit_text_classifier,
                                              majority_label)

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn (the eval extra) is not installed")


def test_classification_counts_each_true_label_by_its_prediction() -> None:
    result = classification(["a", "a", "b", "c", "c", "c"], ["a", "b", "b", "c", "a", "c"], ["a", "b", "c"])
    assert result.confusion == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert result.accuracy == pytest.approx(4 / 6) and result.count == 6 and result.correct == 4
    assert result.to_dict() == {"task": "classify", "source": "", "count": 6, "correct": 4, "accuracy": result.accuracy,
                                "labels": ["a", "b", "c"], "confusion": [[1, 1, 0], [0, 1, 0], [1, 0, 2]]}
    assert result.table().splitlines() == ["| true \\ predicted | a | b | c |", "| --- | ---: | ---: | ---: |",
                                              "| a | 1 | 1 | 0 |", "| b | 0 | 1 | 0 |", "| c | 1 | 0 | 2 |"]


def test_a_label_no_example_has_still_gets_its_row_and_column() -> None:
    result = classification(["b", "b"], ["b", "b"], ["a", "b", "c"])
    assert result.confusion == [[0, 0, 0], [0, 2, 0], [0, 0, 0]] and result.accuracy == 1.0


def test_classification_refuses_what_it_cannot_score() -> None:
    with pytest.raises(GptlabError, match="2 true labels but 1 predictions"):
        classification(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(GptlabError, match="no examples"):
        classification([], [], ["a"])
    with pytest.raises(GptlabError, match="labels not among a, b: z"):
        classification(["a"], ["z"], ["a", "b"])


def test_the_majority_label_and_its_tie_break() -> None:
    assert majority_label(["b", "c", "c", "a"], ["a", "b", "c"]) == "c"
    assert majority_label(["b", "a"], ["a", "b", "c"]) == "a"  # a tie: the first in the label order


@needs_sklearn
def test_character_ngrams_see_order_that_a_bag_of_characters_cannot() -> None:
    """"abab" and "aabb" hold the same characters: a bag of characters cannot tell them apart (it gives
    every passage the label ties go to, the first: exactly half right), bigrams always can."""
    rng = random.Random(0)
    data = []
    for _ in range(60):
        repeats = [rng.randint(1, 3) for _ in range(rng.randint(3, 8))]  # the same shape for both labels
        data += [(" ".join(pattern * n for n in repeats), label) for pattern, label in (("abab", "x"), ("aabb", "y"))]
    train, val = data[:80], data[80:]
    results = {b.name: b for b in baselines(train, val, ["x", "y"])}
    assert list(results) == ["majority class (x)", *TEXT_CLASSIFIERS]
    assert results["majority class (x)"].result.accuracy == 0.5 and results["majority class (x)"].fit_seconds == 0
    assert results["bag of characters"].result.accuracy == 0.5
    assert results["character 1-4-grams"].result.accuracy == 1.0
    assert all(b.fit_seconds > 0 for b in results.values() if b.name in TEXT_CLASSIFIERS)
    assert results["bag of characters"].parameters == 3 * 2 + 2  # "a", "b", " " for each label; two priors
    assert results["majority class (x)"].parameters == 0


@needs_sklearn
def test_a_bag_of_characters_learns_which_characters_a_class_uses() -> None:
    rng = random.Random(1)
    data = [("".join(rng.choice(chars) for _ in range(30)), label)
            for _ in range(50) for chars, label in (("abc ", "first"), ("xyz ", "second"))]
    model = fit_text_classifier("bag of characters", *zip(*data))
    assert list(model.predict(["cab a", "zzy x", "b"])) == ["first", "second", "first"]


@needs_sklearn
def test_a_classifier_needs_a_known_name_and_two_labels() -> None:
    with pytest.raises(GptlabError, match="unknown text classifier 'words'"):
        fit_text_classifier("words", ["a", "b"], ["x", "y"])
    with pytest.raises(GptlabError, match="at least two labels"):
        fit_text_classifier("bag of characters", ["a", "b"], ["x", "x"])
    with pytest.raises(GptlabError, match="training and validation examples"):
        baselines([("a", "x")], [], ["x"])


def test_without_scikit_learn_the_classifiers_say_how_to_install_it(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # an import of it now raises ImportError
    with pytest.raises(GptlabError, match=r"scikit-learn: pip install 'gptlab\[eval\]'"):
        fit_text_classifier("bag of characters", ["a", "b"], ["x", "y"])
