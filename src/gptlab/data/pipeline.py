"""`prepare`: a corpus in, a dataset directory out (token shards per split, meta.json, the tokenizer).

The corpus is streamed: readers yield documents a block at a time, batches of about a megabyte of
text go to the worker processes, and their tokens are appended to the shards in corpus order as they
come back. Memory is bounded by the batches in flight (two per worker), not by the corpus.

The validation split is a deterministic set of whole documents: a document goes to validation when,
as it starts, validation holds less than `val_fraction` of the tokens so far (so with two or more
documents it is never empty, and the documents it takes are spread through the corpus). A corpus of
a single document (one text file, as Tiny Shakespeare) cannot be split by documents: its validation
split is its last `val_fraction` of tokens, the convention of that benchmark.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.fileio import environment_errors
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer

from .inputs import FileSource, Source, file_sources, hf_source
from .layout import FORMAT, FORMAT_VERSION, SPLITS
from .output import OutputDir
from .readers import Corpus, Piece
from .shards import ShardWriter
from .workers import (DOCUMENT_SEPARATOR, Workers, available_cores, distinct_chars, encode, file_sha256, share,
                      tokenizer_spec)

DEFAULT_SHARD_TOKENS = 100_000_000
_BATCH_CHARS = 1 << 20  # text sent to a worker at a time


def prepare(
    inputs: list[str],
    tokenizer: str,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    *,
    text_field: str = "text",
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    skip_binary: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    show_progress: bool | None = None,
) -> dict:
    """Tokenise the corpus into `out_dir` and return its meta.json.

    `tokenizer` is "char", "gpt2" or a directory holding a saved tokenizer (`gptlab tokenizer train`).
    Inputs are files, directories and glob patterns (the format from each file's suffix) and,
    with `hf_dataset`, a Hugging Face dataset. Every check of the inputs and of the output runs
    before anything is written, and the old dataset, if `overwrite` replaces one, goes only when
    the new one is complete. `workers` defaults to every core (one for a corpus of a few MB);
    `show_progress` None means a bar on a terminal only.
    """
    if not 0 <= val_fraction < 1:
        raise GptlabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer not in ("char", "gpt2") and not Path(tokenizer).is_dir():
        raise GptlabError(f"unknown tokenizer {tokenizer!r}; expected 'char', 'gpt2' or a tokenizer directory")
    saved = load_tokenizer(Path(tokenizer)) if tokenizer not in ("char", "gpt2") else None  # (gptlab tokenizer train)
    if shard_tokens < 1 or (workers is not None and workers < 1) or not text_field:
        raise GptlabError("shard_tokens and workers must be positive and text_field must be a field name")
    output = OutputDir(out_dir)
    sources: list[Source] = list(file_sources(inputs, exclude=output.path)) if inputs or not hf_dataset else []
    if hf_dataset:
        sources.append(hf_source(hf_dataset, hf_config, hf_split))
    corpus = Corpus(sources, text_field, skip_binary)
    output.check(overwrite)
    size = corpus.total_bytes
    count = workers or (1 if size is not None and size < 4 * _BATCH_CHARS else available_cores())
    ready = GPT2Tokenizer() if tokenizer == "gpt2" else saved  # built before the workers fork, so they share it
    if ready is not None:
        share(ready)
    with output.staging(overwrite) as staging, Workers(count) as pool:
        hashes = {s.label: pool.submit(file_sha256, s.path) for s in sources if isinstance(s, FileSource)}
        tok: Tokenizer = ready or _char_vocabulary(corpus, pool, show_progress)
        with environment_errors(output.path):
            written = _tokenise(corpus, tok, pool, staging, val_fraction, shard_tokens, show_progress)
        tok.save(staging)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "dtype": written.dtype,
            "train_tokens": sum(s["tokens"] for s in written.shards["train"]),
            "val_tokens": sum(s["tokens"] for s in written.shards["val"]),
            "val_fraction": val_fraction,
            "val_split": written.val_split,
            "documents": written.documents,
            "shards": written.shards,
            "files": [s["file"] for split in SPLITS for s in written.shards[split]]
                     + sorted(p.name for p in staging.iterdir() if not p.name.endswith(".bin")),
            "text_field": text_field,
            "sources": [_provenance(s, hashes) for s in sources if s.label not in corpus.skipped],
            "skipped": list(corpus.skipped),
        }
        output.commit(staging, meta)
    return meta


@dataclass
class _Written:
    dtype: str
    shards: dict[str, list[dict]]
    documents: dict[str, int]
    val_split: str


@dataclass
class _Batch:
    texts: list[str] = field(default_factory=list)
    firsts: list[bool] = field(default_factory=list)
    separate: list[bool] = field(default_factory=list)
    consumed: int = 0
    chars: int = 0


def _batches(pieces: Iterator[Piece]) -> Iterator[_Batch]:
    """Pieces grouped into about _BATCH_CHARS of text; every document but the corpus's first is preceded
    by the separator."""
    batch, started = _Batch(), False
    for piece in pieces:
        batch.texts.append(piece.text)
        batch.firsts.append(piece.first)
        batch.separate.append(piece.first and started)
        started = started or piece.first
        batch.consumed += piece.consumed
        batch.chars += len(piece.text)
        if batch.chars >= _BATCH_CHARS:
            yield batch
            batch = _Batch()
    if batch.texts:
        yield batch


def _progress(corpus: Corpus, description: str, show: bool | None) -> tqdm:
    return tqdm(total=corpus.total_bytes, desc=description, unit="B", unit_scale=True, mininterval=0.5,
                disable=None if show is None else not show)


def _char_vocabulary(corpus: Corpus, pool: Workers, show_progress: bool | None) -> CharTokenizer:
    """The first of two passes for a character tokenizer: every distinct character of the corpus."""
    chars: set[str] = set()
    documents = 0
    with _progress(corpus, "reading characters", show_progress) as bar:
        tasks = ((batch, (batch.texts,)) for batch in _batches(corpus.pieces()))
        for batch, found in pool.ordered(distinct_chars, tasks):
            chars.update(found)
            documents += sum(batch.firsts)
            bar.update(batch.consumed)
    if not "".join(chars).strip():
        raise _empty_corpus()
    if documents > 1:
        chars.update(DOCUMENT_SEPARATOR)
    return CharTokenizer(sorted(chars))


def _tokenise(
    corpus: Corpus, tok: Tokenizer, pool: Workers, staging: Path, val_fraction: float, shard_tokens: int,
    show_progress: bool | None,
) -> _Written:
    """The second pass (the only one for GPT-2): tokens appended to each split's shards in corpus order."""
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    writers = {split: ShardWriter(staging, split, dtype, shard_tokens) for split in SPLITS}
    documents = {split: 0 for split in SPLITS}
    spec = tokenizer_spec(tok)
    counts = {split: 0 for split in SPLITS}  # tokens given to each split so far
    split, started, has_text = "train", 0, False
    with _progress(corpus, "tokenising", show_progress) as bar:
        tasks = ((batch, (spec, batch.texts, batch.separate, dtype.name)) for batch in _batches(corpus.pieces()))
        for batch, (tokens, lengths) in pool.ordered(encode, tasks):
            has_text = has_text or any(text.strip() for text in batch.texts)
            offsets = np.concatenate([[0], np.cumsum(lengths)])  # (pieces + 1,) where each piece's tokens start
            start = counted = 0  # where the run of tokens going to `split` starts; what counts[] holds of them
            for i in np.flatnonzero(batch.firsts):  # a document starts: decide its split
                at = int(offsets[i])
                counts[split] += at - counted
                counted = at
                chosen = _split_of(started, counts["val"], counts["train"] + counts["val"], val_fraction)
                if chosen != split:
                    writers[split].write(tokens[start:at])
                    split, start = chosen, at
                documents[chosen] += 1
                started += 1
            counts[split] += len(tokens) - counted
            writers[split].write(tokens[start:])
            bar.update(batch.consumed)
    if not has_text:
        raise _empty_corpus()
    val_split = "documents" if val_fraction > 0 else "none"
    if started == 1 and val_fraction > 0:
        total = counts["train"]
        writers["train"].move_tail(total - int(total * (1 - val_fraction)), writers["val"])
        val_split = "tail"
    shards = {name: writer.close() for name, writer in writers.items()}
    return _Written(dtype.name, shards, documents, val_split)


def _split_of(document: int, val_tokens: int, total: int, val_fraction: float) -> str:
    """Document number `document` (from 0) goes to validation while validation is short of its share."""
    return "val" if document > 0 and val_tokens < val_fraction * total else "train"


def _empty_corpus() -> GptlabError:
    return GptlabError("the corpus is empty: every input is empty or whitespace only")


def _provenance(source: Source, hashes: dict) -> dict:
    if isinstance(source, FileSource):
        record = {"path": str(source.path), "bytes": source.size, "sha256": hashes[source.label].result()}
        if source.format != "text" or source.compression:
            record["format"] = source.format + (f"+{source.compression}" if source.compression else "")
        return record
    return {"hf_dataset": source.name, "config": source.config, "split": source.split,
            "fingerprint": getattr(source.dataset, "_fingerprint", None),
            "rows": getattr(source.dataset, "num_rows", None)}

