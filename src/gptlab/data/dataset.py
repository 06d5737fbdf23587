"""The prepared dataset: memory-mapped token splits and random or consecutive windows over them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer, load_tokenizer

SPLITS = ("train", "val")
_SPLIT_LABELS = {"train": "training", "val": "validation"}


class TokenDataset:
    """A prepared data directory: memory-mapped splits, its meta.json and its tokenizer."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise GptlabError(f"data directory {self.data_dir} does not exist; run gptlab prepare")
        meta_file = self.data_dir / "meta.json"
        if not meta_file.is_file():
            raise GptlabError(f"{self.data_dir} is not a prepared data directory (no meta.json); run gptlab prepare")
        try:
            self.meta: dict = json.loads(meta_file.read_text(encoding="utf-8"))
            dtype = np.dtype(self.meta["dtype"])
        except (ValueError, KeyError, TypeError) as exc:
            raise GptlabError(f"{meta_file} is unreadable ({exc}); run gptlab prepare --overwrite") from None
        self.tokenizer: Tokenizer = load_tokenizer(self.data_dir)
        self._splits = {name: self._open_split(name, dtype) for name in SPLITS}

    def _open_split(self, name: str, dtype: np.dtype) -> np.ndarray:
        file = self.data_dir / f"{name}.bin"
        if not file.is_file():
            raise GptlabError(f"{file} is missing; run gptlab prepare --overwrite")
        expected = self.meta.get(f"{name}_tokens")
        size = file.stat().st_size
        if not isinstance(expected, int) or size != expected * dtype.itemsize:
            raise GptlabError(f"{file} does not match meta.json ({expected} tokens); run gptlab prepare --overwrite")
        if size == 0:  # mmap cannot map an empty file, and an empty split is legitimate (val_fraction=0)
            return np.empty(0, dtype=dtype)
        return np.memmap(file, dtype=dtype, mode="r")

    def split(self, name: str) -> np.ndarray:
        """The whole split as a read-only memmap (or an empty array)."""
        if name not in self._splits:
            raise GptlabError(f"unknown split {name!r}; expected 'train' or 'val'")
        return self._splits[name]

    def check_length(self, split: str, block_size: int) -> np.ndarray:
        """The split, if it holds at least one training window of block_size + 1 tokens."""
        data = self.split(split)
        if len(data) < block_size + 1:
            raise GptlabError(
                f"the {_SPLIT_LABELS[split]} split has {len(data)} tokens, fewer than one context window of "
                f"block_size+1 = {block_size + 1}; use a smaller --block-size or more data"
            )
        return data

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x is (batch_size, block_size) int64 and y is x shifted left by one."""
        if batch_size < 1 or block_size < 1:
            raise GptlabError(f"batch size and block size must be positive, got {batch_size} and {block_size}")
        data = self.check_length(split, block_size)
        offsets = rng.integers(0, len(data) - block_size, size=batch_size)
        windows = data[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
        xy = torch.from_numpy(windows)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def iter_windows(
        self, split: str, block_size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows that predict every token of the split after the first once.

        Full windows come in batches of up to `batch_size`; a final shorter window, if any, comes alone
        as a (1, length) batch. Batches therefore differ in size: average losses by token count.
        """
        if batch_size < 1 or block_size < 1:
            raise GptlabError(f"batch size and block size must be positive, got {batch_size} and {block_size}")
        data = self.split(split)
        if len(data) < 2:
            raise GptlabError(
                f"the {_SPLIT_LABELS[split]} split has {len(data)} tokens, too few to evaluate (at least 2); "
                "use more data or a larger val_fraction"
            )
        targets = len(data) - 1
        full_windows = targets // block_size
        for first in range(0, full_windows, batch_size):
            count = min(batch_size, full_windows - first)
            start = first * block_size
            chunk = np.asarray(data[start : start + count * block_size + 1], dtype=np.int64)
            yield _as_pair(chunk, count, block_size)
        tail = targets - full_windows * block_size
        if tail:
            chunk = np.asarray(data[full_windows * block_size :], dtype=np.int64)
            yield _as_pair(chunk, 1, tail)


def _as_pair(chunk: np.ndarray, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(chunk[:-1].reshape(rows, length).copy())
    y = torch.from_numpy(chunk[1:].reshape(rows, length).copy())
    return x, y


