"""Task models at work: texts to label probabilities, choices to scores, and accuracy on labelled data.

How an input becomes ids is decided here once, for training (gptlab.train.labeled_data) and for use:

- classification: the text's tokens, padded on the right with the pad id (the tokenizer's end-of-text
  token, or a newline for a character vocabulary); the head reads the last token that is not the pad
  id, as GPT2ForSequenceClassification does (so a character model ignores trailing newlines). A text
  longer than the context keeps its last `block_size` tokens: the head reads the end, and what it reads
  then sees as much of the text as fits.
- multiple choice (GPT-1, sec. 3.3): context, DELIMITER, choice, then the extract token, whose final
  state the head scores. GPT-1 added learned start, delimiter and extract tokens; a GPT-2 vocabulary has
  none to spare, so without adding tokens (which would change the vocabulary that transformers and the
  tokenizer expect) the delimiter is a newline and the extract token is the end-of-text token, which GPT-2
  already reads as "the text is over" (a newline for a character vocabulary). A context too long is cut
  from the left; a choice that leaves no room for any context is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import find_tokenizer, load_task_model, read_task_head, resolve_model_dir
from ..data.labeled import ChoiceExample, ClassifyExample, TaskEvaluation, classification, read_split
from ..errors import GptlabError
from ..heads import MultipleChoice, SequenceClassifier
from ..tokenizers import TOKENIZER_FILE, Tokenizer, document_start_ids

DELIMITER = "\n"  # between a choice's context and the choice


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that pads a batch's shorter rows, and ends a choice as its extract token."""
    return document_start_ids(tokenizer)[0]


def encode_text(tokenizer: Tokenizer, text: str, block_size: int, where: str = "text") -> tuple[list[int], bool]:
    """A text's ids for the classifier, its last `block_size` kept; and whether any were cut."""
    ids = _encode(tokenizer, text, where)
    if not ids:
        raise GptlabError(f"{where}: the text is empty")
    return ids[-block_size:], len(ids) > block_size


def encode_choice(tokenizer: Tokenizer, context: str, choice: str, block_size: int,
                  where: str = "choice") -> tuple[list[int], bool]:
    """context + DELIMITER + choice + extract token, the context cut from the left to fit; and whether it was."""
    tail = _encode(tokenizer, DELIMITER, where) + _encode(tokenizer, choice, where) + [pad_id(tokenizer)]
    if len(tail) >= block_size:
        raise GptlabError(f"{where}: the choice takes {len(tail)} tokens with its delimiter and extract token, "
                          f"leaving no room for the context in {block_size}; shorten it or raise --block-size")
    context_ids = _encode(tokenizer, context, where)
    room = block_size - len(tail)
    return context_ids[-room:] + tail if context_ids else tail, len(context_ids) > room


def _encode(tokenizer: Tokenizer, text: str, where: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except GptlabError as exc:
        raise GptlabError(f"{where}: {exc}") from None


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Rows of ids -> (B, T), T the longest, shorter rows padded on the right."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def choice_batch(examples: Sequence[Sequence[Sequence[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples of N choices' ids each -> ids (B, N, T) padded, and each choice's extract position (B, N)."""
    flat = [row for choices in examples for row in choices]
    B, N = len(examples), len(examples[0])
    ids = pad_rows(flat, pad).view(B, N, -1)  # (B, N, T)
    mc_token_ids = torch.tensor([len(row) - 1 for row in flat], dtype=torch.long).view(B, N)  # (B, N)
    return ids, mc_token_ids


@dataclass
class Classifier:
    """A classifier run ready to use: `predict(texts)` gives each text's probability per label."""

    model: SequenceClassifier
    tokenizer: Tokenizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 16

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    @torch.no_grad()
    def predict(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) texts -> (N, num_labels) probabilities. Without a pad id (a Hugging Face classifier saved
        without one) each text is read alone, as transformers must."""
        size = self.batch_size if self.model.pad_token_id is not None else 1
        pad = self.model.pad_token_id if self.model.pad_token_id is not None else 0
        block = self.model.config.block_size
        rows = [encode_text(self.tokenizer, t, block, f"text {i + 1}")[0] for i, t in enumerate(texts)]
        out = []
        for start in range(0, len(rows), size):
            ids = pad_rows(rows[start: start + size], pad).to(self.device)  # (B, T)
            out.append(torch.softmax(self.model(ids).logits.float(), dim=-1).cpu())  # (B, num_labels)
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def label(self, texts: Sequence[str]) -> list[dict]:
        """Each text with its most probable label and every label's probability."""
        rows = []
        for text, p in zip(texts, self.predict(texts).tolist()):
            rows.append({"text": text, "label": self.labels[max(range(len(p)), key=p.__getitem__)],
                         "probabilities": dict(zip(self.labels, p))})
        return rows


@dataclass
class ChoiceScorer:
    """A multiple-choice run ready to use: `predict(context, choices)` gives each choice's probability."""

    model: MultipleChoice
    tokenizer: Tokenizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def predict(self, context: str, choices: Sequence[str]) -> torch.Tensor:
        """(N,) probabilities, one per choice."""
        block = self.model.config.block_size
        rows = [encode_choice(self.tokenizer, context, c, block, f"choice {i}")[0] for i, c in enumerate(choices)]
        ids, mc = choice_batch([rows], pad_id(self.tokenizer))
        return torch.softmax(self.model(ids.to(self.device), mc.to(self.device)).logits.float(), dim=-1)[0].cpu()


def load_task(path: str | Path, device: str | torch.device = "cpu") -> Classifier | ChoiceScorer:
    """A classify or choice run (a LoRA run's adapter too, on its base), or a Hugging Face
    GPT2ForSequenceClassification / GPT2DoubleHeadsModel directory, with its tokenizer."""
    device = torch.device(device)
    directory = resolve_model_dir(path)
    model = load_task_model(directory, device)
    tokenizer = find_tokenizer(directory, model.config)
    if tokenizer is None:
        raise GptlabError(f"{directory}: no tokenizer ({TOKENIZER_FILE}, or GPT-2's vocab.json + merges.txt) beside "
                          f"a model whose {model.config.vocab_size}-token vocabulary is not GPT-2's")
    if isinstance(model, SequenceClassifier):
        return Classifier(model, tokenizer, device)
    return ChoiceScorer(model, tokenizer, device)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """`load_task` for a classifier; a multiple-choice run is refused."""
    task = load_task(path, device)
    if not isinstance(task, Classifier):
        raise GptlabError(f"{path}: a multiple-choice run (train --task choice), not a classifier; score it with "
                          f"gptlab eval {path} --data FILE")
    return task


def evaluate_task(path: str | Path, data: str, split: str = "val", device: str | torch.device = "cpu") -> TaskEvaluation:
    """Score a task run on `data` (a built-in task's or a directory's `split`, or every row of one file)."""
    kind = task_kind(path)
    if kind is None:
        raise GptlabError(f"{path}: has no task head (a language model)")
    task = load_task(path, device)
    examples, source = read_split(data, kind, split, task.model.config.block_size)
    if isinstance(task, Classifier):
        return _evaluate_classifier(task, examples, source)
    return _evaluate_choices(task, examples, source)


def task_kind(path: str | Path) -> str | None:
    """"classify" or "choice" for a task run, None for a language model, read from its config alone."""
    head = read_task_head(resolve_model_dir(path))
    return None if head is None else head.kind


def _evaluate_classifier(task: Classifier, examples: list[ClassifyExample], source: str) -> TaskEvaluation:
    index = {name: i for i, name in enumerate(task.labels)}
    unknown = sorted({label for _, label in examples} - index.keys())
    if unknown:
        raise GptlabError(f"--data {source}: label(s) {', '.join(map(repr, unknown[:5]))} unknown to the run "
                          f"(its labels: {', '.join(task.labels)})")
    predicted = task.predict([text for text, _ in examples]).argmax(-1).tolist()
    return classification([label for _, label in examples], [task.labels[i] for i in predicted], task.labels, source)


def _evaluate_choices(task: ChoiceScorer, examples: list[ChoiceExample], source: str) -> TaskEvaluation:
    correct = sum(int(task.predict(context, choices).argmax()) == label for context, choices, label in examples)
    return TaskEvaluation("choice", source, len(examples), correct)
