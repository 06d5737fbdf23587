"""Non-neural text classifiers to hold a fine-tuned GPT's accuracy against, and one way to score any classifier.

A classifier's accuracy means little alone: on three classes, 40% is chance for one task and a feat for
another. So a fine-tuned model is reported beside
- chance: the majority class of the training set (what a model that learned only the class counts
  scores) and uniform guessing, 1/k;
- a bag of characters: which characters a text holds and how often, order ignored (scikit-learn's
  `CountVectorizer(analyzer="char")` with multinomial naive Bayes);
- character n-grams: the counts of every 1- to 4-character run inside words (`analyzer="char_wb"`), the
  classic strong baseline for telling styles and languages apart, with the same naive Bayes.
Naive Bayes, not logistic regression: on the play-kind task (80,000 passages) it fitted in 1 to 10 s
against 30 to 55 s and scored as well or better (64-character passages: characters 41.2% against 44.3%,
n-grams 49.0% against 47.4% with tf-idf and logistic regression; 256 characters: 51.3% against 54.7%,
59.8% against 57.4%), measured on 2 shared cores.

They are scored by `gptlab.data.labeled.classification`, as `gptlab eval` scores a classifier run. The
classifiers import scikit-learn (the `eval` extra) when they are fitted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.labeled import TaskEvaluation, classification
from ..errors import GptlabError

# name -> (CountVectorizer's arguments, what it reads): both are fitted with multinomial naive Bayes
TEXT_CLASSIFIERS: dict[str, dict[str, Any]] = {
    "bag of characters": dict(analyzer="char", ngram_range=(1, 1), lowercase=False),
    "character 1-4-grams": dict(analyzer="char_wb", ngram_range=(1, 4), lowercase=False),
}


def majority_label(train_labels: Sequence[str], labels: Sequence[str]) -> str:
    """The training set's most common label (a tie goes to the one first in `labels`)."""
    counts = Counter(train_labels)
    return max(labels, key=lambda label: (counts[label], -labels.index(label)))


def fit_text_classifier(name: str, texts: Sequence[str], labels: Sequence[str]) -> Any:
    """One of `TEXT_CLASSIFIERS` fitted on the texts: a scikit-learn pipeline whose `predict` takes texts."""
    if name not in TEXT_CLASSIFIERS:
        raise GptlabError(f"unknown text classifier {name!r}; known: {', '.join(TEXT_CLASSIFIERS)}")
    try:
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.naive_bayes import MultinomialNB
        from sklearn.pipeline import make_pipeline
    except ImportError:
        raise GptlabError("the text classifier baselines need scikit-learn: pip install 'gptlab[eval]'") from None
    if len(set(labels)) < 2:
        raise GptlabError("a classifier needs examples of at least two labels to learn from")
    return make_pipeline(CountVectorizer(**TEXT_CLASSIFIERS[name]), MultinomialNB()).fit(list(texts), list(labels))


@dataclass(frozen=True)
class Baseline:
    """A baseline's score on the validation set, the seconds its fitting took and the parameters it learned
    (naive Bayes: a log-probability per feature and label, and each label's prior; the majority class: 0)."""

    name: str
    result: TaskEvaluation
    fit_seconds: float
    parameters: int


def baselines(train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]],
              labels: Sequence[str]) -> list[Baseline]:
    """Every baseline fitted on `train` and scored on `val` ((text, label) pairs): the majority class, then
    each of `TEXT_CLASSIFIERS`. Uniform guessing has no one confusion matrix: its accuracy is 1/len(labels)."""
    if not train or not val:
        raise GptlabError("the baselines need training and validation examples")
    train_texts, train_labels = zip(*train)
    val_texts, val_labels = zip(*val)
    majority = majority_label(train_labels, list(labels))
    found = [Baseline(f"majority class ({majority})",
                      classification(val_labels, [majority] * len(val_labels), labels), 0.0, 0)]
    for name in TEXT_CLASSIFIERS:
        start = time.perf_counter()
        model = fit_text_classifier(name, train_texts, train_labels)
        seconds = time.perf_counter() - start
        bayes = model[-1]
        found.append(Baseline(name, classification(val_labels, list(model.predict(list(val_texts))), labels),
                              seconds, bayes.feature_log_prob_.size + bayes.class_log_prior_.size))
    return found
