"""The test tasks' data sets, read from the JSON Lines files beside this file (no network, no hub).

lm-eval calls `custom_dataset` with the task's `dataset_kwargs`; paths relative to this file keep the
tasks usable from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs) -> datasets.DatasetDict:
    return _load("multiple_choice")


def rolling(**kwargs) -> datasets.DatasetDict:
    return _load("rolling")


def generation(**kwargs) -> datasets.DatasetDict:
    return _load("generation")


def last_word(**kwargs) -> datasets.DatasetDict:
    return _load("last_word")
