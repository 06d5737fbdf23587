"""The one thread that owns the model: request handlers hand it jobs through a queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation import Completion, SamplingParams, TextStream, complete
from ..tokenizers import Tokenizer
from .schemas import ServerStats

logger = logging.getLogger("gptlab.serve")


class Counters:
    """ServerStats shared by the event loop and the worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = ServerStats()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def snapshot(self) -> ServerStats:
        with self._lock:
            return self._stats.model_copy()


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Hand a result to the event loop; a loop that has shut down no longer wants it."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


Choice = tuple[list[int], SamplingParams]  # one choice to generate: prompt ids and how to sample


@dataclass
class _CompletionJob:
    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future  # -> list[Completion], one per choice


@dataclass
class StreamJob:
    """One streamed request: its events arrive on `events`; `cancel()` stops its generation."""

    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    streams: list[TextStream] = field(default_factory=list)
    open: list[bool] = field(default_factory=list)  # per choice: still generating

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, *event: Any) -> None:
        _post(self.loop, self.events.put_nowait, event)


class GenerationWorker:
    """The one thread that runs the model, fed through a queue."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_batch: int, counters: Counters) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.counters = counters
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptlab-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def waiting(self) -> int:
        """Jobs handed to the worker that it has not picked up yet."""
        return self._inbox.qsize()

    async def complete(self, choices: list[Choice]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        job = _CompletionJob(choices, loop, loop.create_future())
        self._inbox.put(job)
        return await job.future

    def open_stream(self, choices: list[Choice]) -> StreamJob:
        job = StreamJob(choices, asyncio.get_running_loop())
        self._inbox.put(job)
        return job

    def _run(self) -> None:
        streams: list[StreamJob] = []
        while True:
            waiting: list[_CompletionJob] = []
            try:
                # with no stream to step, sleep until work arrives; otherwise only look
                item = self._inbox.get(block=not streams)
                while True:
                    if item is None:
                        for job in streams:
                            self._close(job)
                        return
                    (streams if isinstance(item, StreamJob) else waiting).append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if waiting:
                self._complete_all(waiting)
            streams = [job for job in streams if self._step(job)]

    def _complete_all(self, jobs: list[_CompletionJob]) -> None:
        """Generate every choice of every waiting job, batching choices that sample alike; answer
        each job as soon as its last choice is done.

        Batching never changes a choice's text: `complete` gives each row the tokens it would get
        alone (a seeded row draws from its own generator).
        """
        results: dict[int, list[Completion | None]] = {id(job): [None] * len(job.choices) for job in jobs}
        unanswered = {id(job) for job in jobs}
        groups: dict[str, list[tuple[_CompletionJob, int]]] = {}
        for job in jobs:
            for k, (_, params) in enumerate(job.choices):
                groups.setdefault(repr(params), []).append((job, k))
        for items in groups.values():
            for start in range(0, len(items), self.max_batch):
                batch = [(job, k) for job, k in items[start:start + self.max_batch] if id(job) in unanswered]
                errors = self._generate(batch, results)
                for job in {id(job): job for job, _ in batch}.values():
                    if id(job) in errors:
                        _post(job.loop, _resolve, job.future, None, errors[id(job)])
                    elif all(r is not None for r in results[id(job)]):
                        _post(job.loop, _resolve, job.future, results[id(job)])
                    else:
                        continue
                    unanswered.discard(id(job))

    def _generate(self, items: list[tuple[_CompletionJob, int]],
                  results: dict[int, list[Completion | None]]) -> dict[int, BaseException]:
        """One `complete` call, filling `results`; the errors by job. If a call for several jobs
        fails, they are retried one by one so the failure lands only on the request that caused it."""
        if not items:
            return {}
        try:
            batch = complete(self.model, self.tokenizer, [job.choices[k][0] for job, k in items],
                             items[0][0].choices[items[0][1]][1])
        except Exception as exc:
            jobs = list({id(job): job for job, _ in items}.values())
            if len(jobs) == 1:
                logger.exception("generation failed")
                return {id(jobs[0]): exc}
            errors: dict[int, BaseException] = {}
            for job in jobs:
                errors.update(self._generate([(j, k) for j, k in items if j is job], results))
            return errors
        self.counters.add(batches=1, batched_rows=len(batch),
                          completion_tokens=sum(len(c.token_ids) for c in batch))
        for (job, k), completion in zip(items, batch):
            results[id(job)][k] = completion
        return {}

    def _step(self, job: StreamJob) -> bool:
        """Advance every open choice of a stream by one piece; False once the job is over."""
        if job.cancelled.is_set():
            self._close(job)
            self.counters.add(cancelled_streams=1)
            return False
        try:
            if not job.streams:
                job.streams = [TextStream(self.model, self.tokenizer, ids, params) for ids, params in job.choices]
                job.open = [True] * len(job.streams)
            for index, stream in enumerate(job.streams):
                if not job.open[index]:
                    continue
                try:
                    piece = next(stream)
                except StopIteration:
                    job.open[index] = False
                    self.counters.add(completion_tokens=stream.completion_tokens)
                    job.emit("finish", index, stream.finish_reason, stream.completion_tokens)
                else:
                    job.emit("piece", index, piece)
        except Exception as exc:
            logger.exception("streamed generation failed")
            self._close(job)
            job.emit("error", exc)
            return False
        if not any(job.open):
            job.emit("done")
            return False
        return True

    def _close(self, job: StreamJob) -> None:
        for stream, still_open in zip(job.streams, job.open):
            if still_open:
                stream.close()
                self.counters.add(completion_tokens=stream.completion_tokens)
        job.open = [False] * len(job.streams)
