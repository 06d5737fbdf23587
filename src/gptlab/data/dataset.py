"""A prepared dataset: each split's shards memory-mapped, and random or consecutive windows over them.

Nothing is loaded up front: a window is read from the page cache when it is drawn, so a corpus of
any size costs the memory of the batches in use. Every read checks that its ids are inside the
tokenizer's vocabulary, which is cheap (a max over the batch) and turns a damaged or foreign shard
into one line naming the file instead of an index error deep inside the embedding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer, load_tokenizer

from .layout import SPLITS, read_meta

_SPLIT_LABELS = {"train": "training", "val": "validation"}


class TokenSplit:
    """One split's tokens, read as if its shards were one array: `len`, slices, index arrays and
    `np.asarray` (which is the memmap itself when the split has one shard, and a copy otherwise)."""

    def __init__(
        self, name: str, arrays: list[np.ndarray], files: list[Path], vocab_size: int, dtype: np.dtype
    ) -> None:
        self.name = name
        self.files = files
        self.dtype = np.dtype(dtype)
        self._arrays = arrays
        self._vocab_size = vocab_size
        self._ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)  # (n_shards,)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise GptlabError("a token split can only be sliced contiguously")
            return self._checked_range(start, max(start, stop))
        if isinstance(index, (int, np.integer)):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"token {index} is outside the {self.name} split of {len(self)} tokens")
            return self._checked_range(position, position + 1)[0]
        return self.gather(np.asarray(index))

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self._checked_range(0, len(self))
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at `positions` (any shape), in the split's dtype."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(self._arrays) == 1:
            return self._checked(self._arrays[0][positions], 0)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"a position is outside the {self.name} split of {len(self)} tokens")
        shard = np.searchsorted(self._ends, positions, side="right")  # which shard holds each position
        out = np.empty(positions.shape, dtype=self.dtype)
        for i in np.unique(shard):
            here = shard == i
            start = self._ends[i] - len(self._arrays[i])
            out[here] = self._checked(self._arrays[i][positions[here] - start], int(i))
        return out

    def _checked_range(self, start: int, stop: int) -> np.ndarray:
        """Tokens start..stop: a view of the memmap when one shard holds them all, else a copy."""
        first = int(np.searchsorted(self._ends, start, side="right"))
        pieces = []
        i = first
        while i < len(self._arrays) and start < stop:
            begin = start - (self._ends[i] - len(self._arrays[i]))
            take = min(stop - start, len(self._arrays[i]) - begin)
            pieces.append(self._checked(self._arrays[i][begin : begin + take], i))
            start += take
            i += 1
        if not pieces:
            return np.empty(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _checked(self, tokens: np.ndarray, shard: int) -> np.ndarray:
        if tokens.size and int(tokens.max()) >= self._vocab_size:
            raise GptlabError(
                f"{self.files[shard]} holds token id {int(tokens.max())}, outside the vocabulary of "
                f"{self._vocab_size}: the file is damaged or belongs to another dataset; run gptlab prepare "
                "--overwrite"
            )
        return tokens


class TokenDataset:
    """A prepared data directory: its splits, its meta.json and its tokenizer."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.meta: dict = read_meta(self.data_dir)
        self.tokenizer: Tokenizer = load_tokenizer(self.data_dir)
        if self.tokenizer.vocab_size != self.meta["vocab_size"]:
            raise GptlabError(
                f"{self.data_dir}: meta.json says vocabulary {self.meta['vocab_size']}, its tokenizer has "
                f"{self.tokenizer.vocab_size}; run gptlab prepare --overwrite"
            )
        self._splits = {name: self._open_split(name) for name in SPLITS}

    def _open_split(self, name: str) -> TokenSplit:
        dtype = np.dtype(self.meta["dtype"])
        arrays, files = [], []
        for shard in self.meta["shards"][name]:
            file = self.data_dir / shard["file"]
            if not file.is_file():
                raise GptlabError(f"{file} is missing; run gptlab prepare --overwrite")
            if file.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise GptlabError(
                    f"{file} does not match meta.json ({shard['tokens']} tokens); run gptlab prepare --overwrite"
                )
            if shard["tokens"]:  # mmap cannot map an empty file
                arrays.append(np.memmap(file, dtype=dtype, mode="r"))
                files.append(file)
        return TokenSplit(name, arrays, files, self.meta["vocab_size"], dtype)

    def split(self, name: str) -> TokenSplit:
        """The whole split, read lazily from its shards."""
        if name not in self._splits:
            raise GptlabError(f"unknown split {name!r}; expected 'train' or 'val'")
        return self._splits[name]

    def check_length(self, split: str, block_size: int) -> TokenSplit:
        """The split, if it holds at least one training window of block_size + 1 tokens."""
        data = self.split(split)
        if len(data) >= block_size + 1:
            return data
        window = f"fewer than one context window of block_size+1 = {block_size + 1}"
        fraction = self.meta.get("val_fraction")
        if split == "val" and not fraction:
            raise GptlabError(
                f"{self.data_dir} has no validation split (prepared with --val-fraction 0), and training measures "
                "its validation loss there; prepare it again with --val-fraction 0.1 (the default)"
            )
        if split == "val" and len(self.split("train")) >= block_size + 1:  # the share, not the corpus, is short
            raise GptlabError(
                f"the validation split of {self.data_dir} has {len(data)} tokens ({fraction:g} of the data, "
                f"--val-fraction), {window}; prepare it again with a larger --val-fraction, or use a smaller "
                "--block-size"
            )
        raise GptlabError(f"the {_SPLIT_LABELS[split]} split has {len(data)} tokens, {window}; use a smaller "
                          "--block-size or more data")

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        rng: np.random.Generator,
        *,
        rows: slice | Sequence[int] | np.ndarray | None = None,
        pin_memory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x is (rows, block_size) int64 and y is x shifted left by one.

        The offsets of all `batch_size` windows are drawn from `rng` whatever `rows` is, so processes
        that share an rng state draw the same batch; `rows` then picks the windows this process reads
        (a DDP rank its own share). `pin_memory` returns page-locked tensors, which a CUDA copy with
        `non_blocking=True` can overlap with compute.
        """
        if batch_size < 1 or block_size < 1:
            raise GptlabError(f"batch size and block size must be positive, got {batch_size} and {block_size}")
        data = self.check_length(split, block_size)
        offsets = rng.integers(0, len(data) - block_size, size=batch_size)  # (batch_size,)
        if rows is not None:
            offsets = offsets[rows]
        windows = data.gather(offsets[:, None] + np.arange(block_size + 1)).astype(np.int64)  # (rows, T+1)
        if pin_memory:
            x = torch.empty((len(offsets), block_size), dtype=torch.int64, pin_memory=True)
            y = torch.empty((len(offsets), block_size), dtype=torch.int64, pin_memory=True)
            x.numpy()[:] = windows[:, :-1]
            y.numpy()[:] = windows[:, 1:]
            return x, y
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
