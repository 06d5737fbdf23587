"""Corpus preparation: text files in, a directory of token arrays, meta.json and the tokenizer out."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer

from .inputs import resolve_inputs
from .readers import read_source

_DOCUMENT_SEPARATOR = "\n\n"


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
    texts, sources = zip(*(read_source(f) for f in files))
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


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GptlabError(f"output path {out_dir} exists and is not a directory")
    existing = [name for name in ("train.bin", "val.bin") if (out_dir / name).exists()]
    if existing and not overwrite:
        raise GptlabError(f"{out_dir} already contains a prepared dataset ({', '.join(existing)}); use --overwrite")


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
