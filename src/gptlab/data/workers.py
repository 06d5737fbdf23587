"""Tokenising on every core: the jobs a worker process runs, and a bounded pool that returns their
results in order.

tiktoken holds the GIL while it encodes (measured here: two threads encode no faster than one), so
parallelism needs processes. On Linux they are forked, so they share the parent's already built
GPT-2 rank table and imported modules instead of importing torch again each (spawn costs about
220 MB and 3 s per worker here); elsewhere they are spawned. A worker dies with its parent
(PR_SET_PDEATHSIG), so a killed `prepare` leaves no process behind, and ignores Ctrl-C, which the
parent handles.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gptlab.errors import EnvironmentProblem, GptlabError
from gptlab.fileio import environment_errors
from gptlab.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer

DOCUMENT_SEPARATOR = "\n\n"  # between documents, for a tokenizer without an end-of-text token
TokenizerSpec = tuple[str, str]  # ("gpt2", ""), ("char", the vocabulary in id order), ("bpe", "fingerprint:directory")
Tag = TypeVar("Tag")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def tokenizer_spec(tokenizer: Tokenizer) -> TokenizerSpec:
    """What a worker rebuilds the tokenizer from: small, since it travels with every batch."""
    if isinstance(tokenizer, CharTokenizer):
        return ("char", "".join(tokenizer.chars))
    if isinstance(tokenizer, BPETokenizer):  # prepare loads it from a directory; the fingerprint says which
        return ("bpe", f"{tokenizer.fingerprint()}:{tokenizer.directory}")
    return (tokenizer.name, "")


_SHARED: dict[TokenizerSpec, Tokenizer] = {}


def share(tokenizer: Tokenizer) -> None:
    """Keep a tokenizer built in the parent for the workers: forked after this, they inherit it rather
    than each load and build it again (a trained BPE's rank table, as GPT-2's is shared)."""
    _SHARED[tokenizer_spec(tokenizer)] = tokenizer


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if spec in _SHARED:
        return _SHARED[spec]
    kind, detail = spec
    if kind == "bpe":
        fingerprint, _, directory = detail.partition(":")
        tokenizer = load_tokenizer(Path(directory))
        if not isinstance(tokenizer, BPETokenizer) or tokenizer.fingerprint() != fingerprint:
            raise GptlabError(f"the tokenizer in {directory} changed while prepare was reading it")
        return tokenizer
    return CharTokenizer(list(detail)) if kind == "char" else GPT2Tokenizer()


def separator_ids(tokenizer: Tokenizer) -> list[int]:
    """What comes between two documents: GPT-2's end-of-text token, or a blank line."""
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode(DOCUMENT_SEPARATOR)


def encode(spec: TokenizerSpec, texts: list[str], separate: list[bool], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of `texts` in one array, each text preceded by the separator where `separate` says,
    and the number of tokens each text (with its separator) contributed."""
    tokenizer = _tokenizer(spec)
    separator = separator_ids(tokenizer) if any(separate) else []  # a one-document vocabulary may lack it
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)  # (n_texts,)
    for i, (text, before) in enumerate(zip(texts, separate)):
        start = len(ids)
        if before:
            ids.extend(separator)
        if text:
            ids.extend(tokenizer.encode(text))
        lengths[i] = len(ids) - start
    return np.array(ids, dtype=dtype), lengths


def distinct_chars(texts: list[str]) -> str:
    return "".join(set().union(*texts))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with environment_errors(path), open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _start_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class Workers:
    """A process pool (or, for one worker, the calling process) whose `ordered` keeps at most two jobs
    per worker in flight, so the reader never runs ahead of the tokenisers by more than that."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self._pool: ProcessPoolExecutor | None = None
        if self.count > 1:
            method = "fork" if sys.platform == "linux" else "spawn"
            self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context(method),
                                             initializer=_start_worker, initargs=(os.getpid(),))

    def submit(self, job: Callable[..., Any], *args: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(job, *args)
        done: Future = Future()
        try:
            done.set_result(job(*args))
        except Exception as exc:  # noqa: BLE001 - delivered to whoever asks for the result, as a pool would
            done.set_exception(exc)
        return done

    def ordered(self, job: Callable[..., Any], tasks: Iterable[tuple[Tag, tuple]]) -> Iterator[tuple[Tag, Any]]:
        """(tag, job(*args)) for each (tag, args) of `tasks`, in order."""
        window: collections.deque[tuple[Tag, Future]] = collections.deque()
        for tag, args in tasks:
            window.append((tag, self.submit(job, *args)))
            if len(window) >= 2 * self.count:
                yield self._next(window)
        while window:
            yield self._next(window)

    @staticmethod
    def _next(window: collections.deque[tuple[Tag, Future]]) -> tuple[Tag, Any]:
        tag, future = window.popleft()
        try:
            return tag, future.result()
        except BrokenProcessPool:
            raise EnvironmentProblem("a tokenizer process died (out of memory?); try fewer --workers") from None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
