"""Labelled examples for GPT-1's task heads, read, checked and scored: `--task classify` and `--task choice`.

A classification example is (text, label); a multiple-choice one is (context, choices, index of the right
choice). `--data` names one of three sources:

- a built-in task's name (BUILTIN below: a function of the model's context, in tokens, returning
  {"train": [...], "val": [...]} whose texts fit it);
- a directory holding train.jsonl and val.jsonl (or train.csv and val.csv): validation is val;
- one file (JSON lines, or CSV for classification): every tenth example is held out for validation.

Rows are JSON objects (`{"text": ..., "label": ...}`, `{"context": ..., "choices": [...], "label": i}`)
or, for classification, CSV rows with a header naming `text` and `label`. A label is a string or an
integer; a classifier's labels are the distinct labels of its training split, in sorted order (integers
by value). The first fault in a file is one line naming the file and the row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GptlabError
from . import play_kinds

ClassifyExample = tuple[str, str]  # (text, label)
ChoiceExample = tuple[str, list[str], int]  # (context, choices, index of the right one)
Splits = dict[str, list]  # {"train": [...], "val": [...]}

VAL_EVERY = 10  # one file: every tenth example is held out for validation
SPLIT_SUFFIXES = (".jsonl", ".csv")

# Built-in labelled tasks by name, for `--data NAME`: each takes the model's context and returns
# {"train": [(text, label)], "val": [...]}.
BUILTIN: dict[str, Callable[[int], Splits]] = {"shakespeare-kinds": play_kinds.builtin_task}


def is_builtin(data: str) -> bool:
    return data in BUILTIN


def read_splits(data: str, task: str, context: int) -> tuple[Splits, str]:
    """{"train", "val"} examples of `data` for `task` (a model reading `context` tokens), and how
    validation was chosen (for the user)."""
    if task == "classify" and is_builtin(data):
        splits = BUILTIN[data](context)
        return {name: [classify_example(row, f"{data}[{name}][{i}]") for i, row in enumerate(splits[name])]
                for name in ("train", "val")}, "the built-in task's validation split"
    path = Path(data)
    if path.is_dir():
        return {name: read_file(split_file(path, name), task) for name in ("train", "val")}, f"{path}/val"
    examples = read_file(path, task)
    held_out = [e for i, e in enumerate(examples) if i % VAL_EVERY == VAL_EVERY - 1]
    trained = [e for i, e in enumerate(examples) if i % VAL_EVERY != VAL_EVERY - 1]
    if not held_out:
        raise GptlabError(f"--data {path}: {len(examples)} example(s), too few to hold one in {VAL_EVERY} out for "
                          f"validation; give at least {VAL_EVERY}, or a directory with train and val files")
    return {"train": trained, "val": held_out}, f"every {VAL_EVERY}th example of {path.name} ({len(held_out)})"


def read_split(data: str, task: str, split: str, context: int) -> tuple[list, str]:
    """The examples `gptlab eval --data` scores: a built-in task's or a directory's split, or a whole file."""
    if task == "classify" and is_builtin(data):
        return [classify_example(row, f"{data}[{split}][{i}]") for i, row in enumerate(BUILTIN[data](context)[split])], \
            f"{data} ({split})"
    path = Path(data)
    if path.is_dir():
        file = split_file(path, split)
        return read_file(file, task), str(file)
    return read_file(path, task), str(path)


def split_file(directory: Path, split: str) -> Path:
    found = [directory / f"{split}{suffix}" for suffix in SPLIT_SUFFIXES if (directory / f"{split}{suffix}").is_file()]
    if not found:
        raise GptlabError(f"--data {directory}: no {split}.jsonl or {split}.csv in the directory (a directory of "
                          f"labelled data holds train.jsonl and val.jsonl, or .csv)")
    return found[0]


def read_file(path: Path, task: str) -> list:
    """Every example of a JSON-lines or CSV file, checked for `task`."""
    if not path.is_file():
        hint = f"; built-in tasks: {', '.join(BUILTIN)}" if BUILTIN and task == "classify" else ""
        raise GptlabError(f"--data {path}: no such file or directory (expected JSON lines or CSV of labelled "
                          f"examples{hint})")
    check = classify_example if task == "classify" else choice_example
    if path.suffix == ".csv" and task == "choice":
        raise GptlabError(f"--data {path}: --task choice reads JSON lines (a row's choices are a list)")
    rows = _csv_rows(path) if path.suffix == ".csv" else _json_rows(path)
    examples = [check(row, where) for where, row in rows]
    if not examples:
        raise GptlabError(f"--data {path}: no examples in it")
    return examples


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GptlabError(f"--data {path}: cannot read it as UTF-8 text: {exc}") from None


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(_lines(path), start=1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise GptlabError(f"{path}:{number}: not JSON ({exc.msg}); expected one example per line") from None


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    reader = csv.DictReader(_lines(path))
    missing = [c for c in ("text", "label") if c not in (reader.fieldnames or [])]
    if missing:
        raise GptlabError(f"{path}: its header has no {' or '.join(missing)} column (found {reader.fieldnames})")
    for number, row in enumerate(reader, start=2):
        yield f"{path}:{number}", row


def _label_name(label: object, where: str) -> str:
    if isinstance(label, str) and label.strip():
        return label.strip()
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    raise GptlabError(f"{where}: the label must be a non-empty string or an integer, got {label!r}")


def classify_example(row: object, where: str) -> ClassifyExample:
    if isinstance(row, (tuple, list)) and len(row) == 2:  # a built-in task's (text, label)
        row = {"text": row[0], "label": row[1]}
    if not isinstance(row, dict):
        raise GptlabError(f"{where}: expected an object with text and label, got {type(row).__name__}")
    for key in ("text", "label"):
        if row.get(key) is None or row.get(key) == "":
            raise GptlabError(f"{where}: no {key} (each example needs a non-empty text and a label)")
    if not isinstance(row["text"], str):
        raise GptlabError(f"{where}: the text must be a string, got {type(row['text']).__name__}")
    return row["text"], _label_name(row["label"], where)


def choice_example(row: object, where: str) -> ChoiceExample:
    if not isinstance(row, dict):
        raise GptlabError(f"{where}: expected an object with context, choices and label")
    context, choices, label = row.get("context"), row.get("choices"), row.get("label")
    if not isinstance(context, str):
        raise GptlabError(f"{where}: no context string (each example: context, choices, label)")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise GptlabError(f"{where}: choices must be a list of at least 2 non-empty strings, got {choices!r}")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise GptlabError(f"{where}: label must be the index of the right choice, 0 to {len(choices) - 1}, "
                          f"got {label!r}")
    return context, list(choices), label


def label_order(labels: set[str]) -> list[str]:
    """Labels in sorted order, integers by value (2 before 10), then names."""
    return sorted(labels, key=lambda name: (0, int(name), "") if _is_int(name) else (1, 0, name))


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


@dataclass
class TaskEvaluation:
    """Accuracy on labelled examples; for a classifier, the confusion counts too (rows: true label,
    columns: predicted)."""

    kind: str  # "classify" or "choice"
    source: str
    count: int
    correct: int
    labels: tuple[str, ...] = ()
    confusion: list[list[int]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    def to_dict(self) -> dict:
        out = {"task": self.kind, "source": self.source, "count": self.count, "correct": self.correct,
               "accuracy": self.accuracy}
        if self.kind == "classify":
            out |= {"labels": list(self.labels), "confusion": self.confusion}
        return out

    def table(self) -> str:
        """The confusion counts as a markdown table, a row per true label."""
        lines = ["| true \\ predicted | " + " | ".join(self.labels) + " |",
                 "| --- |" + " ---: |" * len(self.labels)]
        lines += [f"| {name} | " + " | ".join(f"{n:,}" for n in row) + " |" for name, row in zip(self.labels, self.confusion)]
        return "\n".join(lines)

def classification(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str],
                   source: str = "") -> TaskEvaluation:
    """Accuracy and confusion of `predicted` against `true`, every label in `labels` given a row and a
    column (one no example has included, so the tables of several classifiers line up): the one scorer of
    a classifier, whether a fine-tuned GPT or a baseline."""
    if len(true) != len(predicted):
        raise GptlabError(f"{len(true)} true labels but {len(predicted)} predictions")
    if not true:
        raise GptlabError("no examples to score")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(label) for label in (*true, *predicted)} - set(index))
    if unknown:
        raise GptlabError(f"labels not among {', '.join(labels)}: {', '.join(unknown)}")
    confusion = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, predicted):
        confusion[index[t]][index[p]] += 1
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return TaskEvaluation("classify", source, len(true), correct, tuple(labels), confusion)
