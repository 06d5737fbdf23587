"""What the loop calls around each optimizer step, as minGPT's trainer triggers its callbacks: the
meter (tokens/s and MFU), the thread tuner (--adapt-threads) and the log (metrics.jsonl and the
progress bar). None of them changes what a step computes, so a run is the same with or without them.

The loop calls, in the order of its list, `fit_begin` before the first step and `fit_end` once after
the last (before the final evaluation), `step_begin` and `step_end` around each step; `step_end` gets
the `Step` just taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..threads import ThreadTuner
from ..throughput import ThroughputMeter, flops_per_token
from .progress import ProgressBar

if TYPE_CHECKING:
    from .loop import Loop


@dataclass(frozen=True)
class Step:
    """One optimizer step as its callbacks see it."""

    number: int  # the step count after it
    loss: float  # the global batch's mean loss, all processes
    lr: float
    grad_norm: float | None  # before clipping; None when not clipped
    tokens: int  # the step's, all processes
    skipped: str  # why its update was skipped (a non-finite loss or gradient), "" if it was not


class Callback:
    """Does nothing at every event; a callback overrides the events it cares about."""

    def fit_begin(self, loop: Loop) -> None:
        pass

    def step_begin(self, loop: Loop) -> None:
        pass

    def step_end(self, loop: Loop, step: Step) -> None:
        pass

    def fit_end(self, loop: Loop) -> None:
        pass


class ThreadTuning(Callback):
    """--adapt-threads: each step's thread count from the times of earlier steps (gptlab.threads). The
    first step of a session compiles and warms up, so it neither runs at a tried count nor is timed."""

    def __init__(self, enabled: bool, say: Callable[[str], None]) -> None:
        self.tuner = ThreadTuner(enabled, say)
        self.started = 0.0

    def step_begin(self, loop: Loop) -> None:
        self.started = time.perf_counter()
        if loop.session_steps:
            self.tuner.before_step()

    def step_end(self, loop: Loop, step: Step) -> None:
        if loop.session_steps:
            self.tuner.after_step(time.perf_counter() - self.started)


class Metering(Callback):
    """Times each step for tokens/s and MFU; the first step of a session pays for warm-up (and
    compilation), so it is not counted."""

    def __init__(self, meter: ThroughputMeter) -> None:
        self.meter = meter

    def step_begin(self, loop: Loop) -> None:
        self.meter.start()

    def step_end(self, loop: Loop, step: Step) -> None:
        if loop.session_steps == 0:
            self.meter.cancel()
        else:
            self.meter.stop(step.tokens, step.tokens * flops_per_token(loop.state.model.config, loop.config.block_size))


class StepLog(Callback):
    """metrics.jsonl's row for every step (its learning rate; its loss, gradient norm, tokens/s and MFU
    every log_interval steps and at the last) and the progress bar, on the main process."""

    def __init__(self, meter: ThroughputMeter) -> None:
        self.meter = meter  # read (and reset) at each logged step
        self.progress: ProgressBar | None = None

    def fit_begin(self, loop: Loop) -> None:
        self.progress = ProgressBar(loop.config, loop.state.step, loop.clock, loop.show)

    def step_end(self, loop: Loop, step: Step) -> None:
        config = loop.config
        if step.skipped:
            loop.metrics.write({"step": step.number, "skipped": step.skipped, "lr": step.lr})
        elif step.number % config.log_interval == 0 or step.number == config.max_iters:
            self._log(loop, step)
        else:
            loop.metrics.write({"step": step.number, "lr": step.lr})  # every step's learning rate, for the record
        self.progress.update(step.number, loop.clock)

    def _log(self, loop: Loop, step: Step) -> None:
        row: dict[str, Any] = {"step": step.number, "loss": step.loss, "lr": step.lr}
        if step.grad_norm is not None:
            row["grad_norm"] = step.grad_norm
        figures = {"loss": f"{step.loss:.4f}", "lr": f"{step.lr:.2e}"}
        tokens_per_s, mfu = self.meter.report()
        if tokens_per_s:
            row.update(tokens_per_s=round(tokens_per_s, 1), mfu=round(mfu, 6))
            figures.update(tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
        loop.metrics.write(row)
        self.progress.show(figures)

    def fit_end(self, loop: Loop) -> None:
        if self.progress is not None:
            self.progress.close()
