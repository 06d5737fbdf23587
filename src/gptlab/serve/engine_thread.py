"""The one thread that owns the engine (and so the model): request handlers hand it jobs and
cancellations through a queue, and it hands back what each job's sequences produce.

The thread loops: take every job and cancellation that arrived, run one engine step (every running
sequence of every job advances together), post each job's new text, log-probabilities and endings
to the event loop, repeat; with nothing to do it measures the kernels of the next batch size it has
not warmed up yet (one forward pass at a time, so a job that arrives waits for one pass at most), then
sleeps until a job arrives. The waiting queue is bounded: `submit` refuses a job whose sequences would
take it past `max_queue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any

from ..inference import Engine, SamplingParams, Sequence, completion_of, failure_cause
from .metrics import Metrics

logger = logging.getLogger("gptlab.serve")

Choice = tuple[list[int], SamplingParams]  # one choice to generate: prompt ids and how to sample


class QueueFull(Exception):
    """The job would take the waiting queue past its bound."""


class Job:
    """One API request's choices, as engine sequences, and the events its handler awaits on `events`.

    Events: ("delta", index, text, logprobs, prompt_logprobs, finish_reason) for a stream (each choice's
    first delta carries its prompt's log-probabilities when asked, its last the finish reason); ("done",
    completions) at the end (the completions for a non-streamed job, None for a stream); ("error",
    exception) if the engine failed one of its sequences.
    """

    def __init__(self, choices: list[Choice], loop: asyncio.AbstractEventLoop, *, stream: bool) -> None:
        self.choices = choices
        self.loop = loop
        self.stream = stream
        self.arrived = time.perf_counter()
        self.events: asyncio.Queue = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.sent: list[tuple[int, int]] = []  # per choice: pieces and logprobs already posted
        self.first_token_seen = False
        self.over = False

    def post(self, *event: Any) -> None:
        """Hand an event to the event loop; a loop that has shut down no longer wants it."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineThread:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int,
                 warm_ups: list[tuple[int, int]] | None = None) -> None:
        self.engine = engine
        self._warm_ups = list(warm_ups or [])  # (batch size, threads) to warm up while idle (`Engine.warm_up`)
        self.metrics = metrics
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queued = 0  # sequences handed over that have not joined the batch (or ended) yet
        self._waiting: list[Sequence] = []  # the engine thread's view of those sequences
        self._jobs: dict[int, tuple[Job, int]] = {}  # id(sequence) -> its job and choice index

    # -- the event loop's side ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when its choices would not fit in the waiting queue."""
        with self._lock:
            if self._queued + len(job.choices) > self.max_queue:
                raise QueueFull
            self._queued += len(job.choices)
            self.metrics.queued.set(self._queued)
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def queued(self) -> int:
        return self._queued

    @property
    def warm(self) -> bool:
        """Whether every batch size has been warmed up (until then a request may wait for one measurement)."""
        return not self._warm_ups

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:
                # idle: sleep until work arrives, unless there is warming up to do
                command = self._inbox.get(block=not engine.busy and not self._warm_ups)
                while True:
                    if command is None:
                        self._shut_down()
                        return
                    self._take(command)
                    command = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if engine.busy:
                started = time.perf_counter()
                touched = engine.step()
                self._account(touched, time.perf_counter() - started)
                self._dispatch(touched)
            elif self._warm_ups:
                try:
                    engine.warm_up(self._warm_ups[:1])
                except Exception as exc:  # noqa: BLE001 - a request at this size will meet the same failure
                    logger.error("warming up (batch size, threads) %s failed: %s", self._warm_ups[0],
                                 failure_cause(exc))
                del self._warm_ups[0]
            self._joined()

    def _take(self, command: Job | tuple[str, Job]) -> None:
        if isinstance(command, Job):
            job = command
            try:  # the handler checked the request already; this is the engine's last word
                for ids, params in job.choices:
                    self.engine.check(ids, params)
            except ValueError as exc:
                with self._lock:
                    self._queued -= len(job.choices)
                job.post("error", exc)
                return
            for index, (ids, params) in enumerate(job.choices):
                seq = self.engine.submit(ids, params)
                job.sequences.append(seq)
                job.sent.append((0, 0))
                self._jobs[id(seq)] = (job, index)
                self._waiting.append(seq)
            self._dispatch([seq for seq in job.sequences if seq.done])  # nothing to compute (max_tokens 0)
        else:
            _, job = command
            for seq in job.sequences:
                self.engine.cancel(seq)
            self._forget(job)

    def _account(self, touched: list[Sequence], seconds: float) -> None:
        m = self.metrics
        generated = sum(1 for s in touched if s.params.max_new_tokens and s.error is None)
        m.steps.inc()
        m.step_seconds.observe(seconds)
        m.batch_size.observe(len(touched))
        m.generation_tokens.inc(generated)
        m.running.set(len(self.engine.rows))
        m.kv_cache_bytes.set(self.engine.cache.nbytes())

    def _joined(self) -> None:
        """Sequences that joined the batch (or ended) leave the waiting queue's count."""
        still = [s for s in self._waiting if not (s.cached or s.done)]
        left = len(self._waiting) - len(still)
        if left:
            self._waiting = still
            with self._lock:
                self._queued -= left
                self.metrics.queued.set(self._queued)

    def _dispatch(self, sequences: list[Sequence]) -> None:
        """Post what these sequences produced to their jobs, then end the jobs whose sequences are all done."""
        jobs: dict[int, Job] = {}
        for seq in sequences:
            entry = self._jobs.get(id(seq))
            if entry is not None and self._progress(seq, *entry):
                jobs[id(entry[0])] = entry[0]
        for job in jobs.values():
            if all(s.done for s in job.sequences):
                job.post("done", None if job.stream else [completion_of(s) for s in job.sequences])
                self._forget(job)

    def _progress(self, seq: Sequence, job: Job, index: int) -> bool:
        """Post one sequence's new text to its job; False once the job has failed."""
        if not job.first_token_seen and seq.first_token_at is not None:
            job.first_token_seen = True
            self.metrics.time_to_first_token.observe(seq.first_token_at - job.arrived)
        if seq.error is not None:
            for other in job.sequences:
                self.engine.cancel(other)
            job.post("error", seq.error)
            self._forget(job)
            return False
        if job.stream:
            pieces, logprobs = job.sent[index]
            text = "".join(seq.pieces[pieces:])
            new_logprobs = None if seq.logprobs is None else seq.logprobs[logprobs:]
            first = pieces == 0 and logprobs == 0
            if text or seq.done or (first and seq.prompt_logprobs is not None):
                job.sent[index] = (len(seq.pieces), 0 if seq.logprobs is None else len(seq.logprobs))
                job.post("delta", index, text, new_logprobs, seq.prompt_logprobs if first else None,
                         seq.finish_reason if seq.done else None)
        return True

    def _forget(self, job: Job) -> None:
        job.over = True
        for seq in job.sequences:
            self._jobs.pop(id(seq), None)

    def _shut_down(self) -> None:
        for job in {id(j): j for j, _ in self._jobs.values()}.values():
            for seq in job.sequences:
                self.engine.cancel(seq)
            job.post("error", RuntimeError("the server is shutting down"))
        self._jobs.clear()

