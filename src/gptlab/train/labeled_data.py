"""Labelled examples as training batches, for `--task classify` and `--task choice` (GPT-1's fine-tuning).

The examples are read and checked by gptlab.data.labeled (where `--data` may also name a built-in task)
and encoded as gptlab.inference.classify encodes them for use, so a run trains on exactly the ids it is
later asked about. `LabeledDataset` has `TokenDataset`'s batching interface (`get_batch`, `check_length`,
`split`), so the training loop steps it unchanged; its batches are the task model's arguments: (ids,
labels) for a classifier, (ids, extract positions, labels) for multiple choice.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import torch

from ..data.labeled import label_order, read_splits
from ..errors import GptlabError
from ..inference.classify import choice_batch, encode_choice, encode_text, pad_id, pad_rows
from ..tokenizers import Tokenizer
from .distributed import is_main_process

Batch = tuple[torch.Tensor, ...]


class LabeledDataset:
    """The train and val examples of `data`, encoded to fit `block_size` tokens."""

    def __init__(self, data: str, task: str, tokenizer: Tokenizer, block_size: int) -> None:
        self.path, self.task, self.tokenizer = data, task, tokenizer
        self.pad_token_id = pad_id(tokenizer)
        splits, validation = read_splits(data, task, block_size)
        cut = 0
        if task == "classify":
            labels = label_order({label for _, label in splits["train"]})
            if len(labels) < 2:
                raise GptlabError(f"--data {data}: every training example has the label {labels[0]!r}; a classifier "
                                  f"needs two labels or more")
            unknown = sorted({label for _, label in splits["val"]} - set(labels))
            if unknown:
                raise GptlabError(f"--data {data}: the validation examples have label(s) {', '.join(map(repr, unknown))} "
                                  f"that no training example has")
            self.labels: tuple[str, ...] = tuple(labels)
            index = {name: i for i, name in enumerate(labels)}
            self._splits: dict[str, list] = {}
            for name, examples in splits.items():
                encoded = []
                for i, (text, label) in enumerate(examples):
                    ids, truncated = encode_text(tokenizer, text, block_size, f"--data {data} ({name} example {i + 1})")
                    cut += truncated
                    encoded.append((ids, index[label]))
                self._splits[name] = encoded
        else:
            self.labels = ()
            counts = {len(choices) for examples in splits.values() for _, choices, _ in examples}
            if len(counts) > 1:
                raise GptlabError(f"--data {data}: examples have {' and '.join(map(str, sorted(counts)))} choices; a "
                                  f"multiple-choice run scores the same number of choices in every example")
            self._splits = {}
            for name, examples in splits.items():
                encoded = []
                for i, (context, choices, label) in enumerate(examples):
                    rows = []
                    for choice in choices:
                        ids, truncated = encode_choice(tokenizer, context, choice, block_size,
                                                       f"--data {data} ({name} example {i + 1})")
                        cut += truncated
                        rows.append(ids)
                    encoded.append((rows, label))
                self._splits[name] = encoded
        if is_main_process():
            counts_line = f"{len(self._splits['train']):,} training and {len(self._splits['val']):,} validation examples"
            print(f"--data {data}: {counts_line}; validation: {validation}", file=sys.stderr)
            if cut:
                print(f"--data {data}: {cut:,} input(s) longer than --block-size {block_size} keep their last "
                      f"{block_size} tokens (a choice's context is cut from the left)", file=sys.stderr)

    def split(self, name: str) -> list:
        if name not in self._splits:
            raise GptlabError(f"unknown split {name!r}; expected 'train' or 'val'")
        return self._splits[name]

    def check_length(self, split: str, block_size: int) -> list:
        """Every example was cut to block_size tokens when it was encoded."""
        return self.split(split)

    def class_counts(self, split: str) -> list[int]:
        """Examples per label (classify), or per index of the right choice (choice)."""
        size = len(self.labels) if self.task == "classify" else len(self.split(split)[0][0])
        counts = [0] * size
        for _, label in self.split(split):
            counts[label] += 1
        return counts

    def collate(self, examples: list) -> Batch:
        """Examples -> the task model's arguments: (ids (B, T), labels (B,)) or (ids (B, N, T), extract
        positions (B, N), labels (B,))."""
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)  # (B,)
        if self.task == "classify":
            return pad_rows([ids for ids, _ in examples], self.pad_token_id), labels
        ids, mc_token_ids = choice_batch([rows for rows, _ in examples], self.pad_token_id)
        return ids, mc_token_ids, labels

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, *,
        rows: slice | None = None, pin_memory: bool = False,
    ) -> Batch:
        """Random examples, as TokenDataset's windows: all `batch_size` draws are made, `rows` picks this
        process's, `pin_memory` page-locks them."""
        examples = self.split(split)
        picked = rng.integers(0, len(examples), size=batch_size)  # (B,)
        batch = self.collate([examples[i] for i in (picked if rows is None else picked[rows])])
        return tuple(t.pin_memory() for t in batch) if pin_memory else batch

    def ordered_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """The whole split in order, for an evaluation that counts every example once."""
        examples = self.split(split)
        for start in range(0, len(examples), batch_size):
            yield self.collate(examples[start: start + batch_size])
