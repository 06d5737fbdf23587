"""Writing one split's tokens as they come: appended to numbered shard files, a new one every
`shard_tokens`, each fsynced when it is full.

The shards are written inside prepare's staging directory, which becomes the dataset only when it
is complete (see output.py), so a shard need not be atomic on its own: a killed run leaves a
staging directory that no reader accepts and the next run removes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .layout import shard_file

_COPY_TOKENS = 1 << 24  # how much of a shard move_tail copies at a time


class ShardWriter:
    """Appends tokens of one split to `directory/{split}-NNNNNN.bin`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self._shards: list[list] = []  # [file name, tokens] per shard
        self._handle: BinaryIO | None = None
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._handle is None or self._shards[-1][1] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self._shards[-1][1]
            part, tokens = tokens[:room], tokens[room:]
            self._handle.write(memoryview(part).cast("B"))  # type: ignore[union-attr]
            self._shards[-1][1] += len(part)
            self.tokens += len(part)

    def move_tail(self, count: int, to: ShardWriter) -> None:
        """Move the last `count` tokens written here to the end of `to`, in order (the validation tail
        of a one-document corpus). Copies a bounded chunk at a time."""
        self._close_current()
        cut = self.tokens - count
        index, begin = 0, cut
        while index < len(self._shards) and begin >= self._shards[index][1]:
            begin -= self._shards[index][1]
            index += 1
        for i in range(index, len(self._shards)):
            name, length = self._shards[i]
            shard = np.memmap(self.directory / name, dtype=self.dtype, mode="r")
            for start in range(begin if i == index else 0, length, _COPY_TOKENS):
                to.write(shard[start : start + _COPY_TOKENS])
            del shard
        for name, _ in self._shards[index + (1 if begin else 0) :]:
            (self.directory / name).unlink()
        if begin:
            os.truncate(self.directory / self._shards[index][0], begin * self.dtype.itemsize)
            self._shards[index][1] = begin
        del self._shards[index + (1 if begin else 0) :]
        self.tokens = cut

    def close(self) -> list[dict]:
        """Flush and fsync; the shard list for meta.json."""
        self._close_current()
        return [{"file": name, "tokens": tokens} for name, tokens in self._shards]

    def _open_next(self) -> None:
        self._close_current()
        name = shard_file(self.split, len(self._shards))
        self._handle = open(self.directory / name, "xb", buffering=1 << 22)
        self._shards.append([name, 0])

    def _close_current(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with handle:
                handle.flush()
                os.fsync(handle.fileno())
