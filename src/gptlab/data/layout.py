"""What a prepared dataset directory holds, and how to tell one from a directory that is not ours.

A dataset is `meta.json`, the tokenizer's files and one or more token shards per split. meta.json
carries a marker (`"format": "gptlab-dataset"`) and lists every file of the dataset, so
`prepare --overwrite` can replace exactly those files and nothing else of the directory. While a
replacement is being put in place, meta.json says `"incomplete"`: the directory is still recognisably
a gptlab dataset (and can be overwritten again), but `TokenDataset` refuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptlab.errors import GptlabError
from gptlab.tokenizers import TOKENIZER_FILE

META_FILE = "meta.json"
FORMAT = "gptlab-dataset"
FORMAT_VERSION = 2
LOCK_FILE = ".gptlab-prepare.lock"
STAGING_PREFIX = ".gptlab-staging-"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")

# What prepare wrote before meta.json listed its files (format 1): one flat .bin per split.
_FORMAT_1_FILES = ("train.bin", "val.bin", TOKENIZER_FILE, "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
_FORMAT_1_KEYS = {"tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens", "sources"}


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:06d}.bin"


def is_ours(name: str) -> bool:
    """Files prepare keeps beside a dataset that are no part of it: its lock and its staging area."""
    return name == LOCK_FILE or name.startswith(STAGING_PREFIX)


@dataclass(frozen=True)
class Existing:
    """What an output directory already holds: `kind` is "none", "dataset", "incomplete", "format-1" or
    "foreign" (anything that is not a gptlab dataset); `files` are the dataset's own files."""

    kind: str
    files: tuple[str, ...] = field(default=())

    @property
    def is_dataset(self) -> bool:
        return self.kind in ("dataset", "incomplete", "format-1")


def inspect(directory: Path) -> Existing:
    """Classify `directory` without changing it."""
    if not directory.is_dir():
        return Existing("none")
    names = {p.name for p in directory.iterdir() if not is_ours(p.name)}
    if not names:
        return Existing("none")
    meta = _read_json(directory / META_FILE)
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        files = meta.get("files")
        if isinstance(files, list) and all(isinstance(f, str) and "/" not in f for f in files):
            return Existing("incomplete" if meta.get("incomplete") else "dataset", tuple(files))
    if isinstance(meta, dict) and _FORMAT_1_KEYS <= meta.keys() and {"train.bin", "val.bin", TOKENIZER_FILE} <= names:
        return Existing("format-1", tuple(f for f in _FORMAT_1_FILES if f in names))
    return Existing("foreign")


def read_meta(directory: Path) -> dict:
    """meta.json of a complete dataset, checked enough that reading its shards cannot go astray."""
    meta_file = directory / META_FILE
    if not directory.is_dir():
        raise GptlabError(f"data directory {directory} does not exist; run gptlab prepare")
    if not meta_file.is_file():
        raise GptlabError(f"{directory} is not a prepared data directory (no {META_FILE}); run gptlab prepare")
    meta = _read_json(meta_file)
    redo = f"run gptlab prepare --out {directory} --overwrite"
    if not isinstance(meta, dict):
        raise GptlabError(f"{meta_file} is unreadable; {redo}")
    if meta.get("format") != FORMAT:
        if _FORMAT_1_KEYS <= meta.keys():
            raise GptlabError(f"{directory} was prepared by an older gptlab (one .bin per split); {redo}")
        raise GptlabError(f"{meta_file} is not a gptlab dataset's meta.json; run gptlab prepare")
    if meta.get("incomplete"):
        raise GptlabError(f"{directory} holds an incomplete dataset (a prepare was interrupted); {redo}")
    try:
        if meta["format_version"] != FORMAT_VERSION:
            raise GptlabError(f"{directory} has dataset format {meta['format_version']}, this gptlab reads "
                              f"{FORMAT_VERSION}; {redo}")
        if meta["dtype"] not in DTYPES or not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
            raise ValueError("dtype or vocab_size")
        for split in SPLITS:
            shards = meta["shards"][split]
            if not all(isinstance(s["file"], str) and "/" not in s["file"] and isinstance(s["tokens"], int)
                       and s["tokens"] >= 0 for s in shards):
                raise ValueError(f"the {split} shard list")
            if sum(s["tokens"] for s in shards) != meta[f"{split}_tokens"]:
                raise ValueError(f"{split}_tokens is not the sum of its shards")
    except (KeyError, TypeError, ValueError) as exc:
        raise GptlabError(f"{meta_file} is damaged ({exc}); {redo}") from None
    if np.dtype(meta["dtype"]).itemsize == 2 and meta["vocab_size"] > 65536:
        raise GptlabError(f"{meta_file} is damaged (uint16 cannot hold a vocabulary of {meta['vocab_size']}); {redo}")
    return meta


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
