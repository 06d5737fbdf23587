"""What the terminal shows of a run: a progress bar over the budget that ends it, and a word at the end
when the machine was too busy for a time budget to buy what it should.

A time-limited run's bar counts seconds of --max-time, so its ETA is the time left (a bar over
max_iters would promise `1257/100000 [04:01<5:15:34]` for a run ending in a minute). Whether the
CPU was busy is measured, not guessed: Linux counts, for every thread, the time it ran and the time it
waited, ready to run, for a core that other programs held (/proc/self/task/*/schedstat), and the load
average counts the threads that want a core (`CpuWait`). A quiet machine makes the threads wait almost
never, however well or badly they use their cores; when they waited a share w of the time, a
time-limited run took 1 - w of the steps the same machine gives when quiet, and from BUSY_SHARE on the
user should know before trusting the model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from .config import TrainConfig

# A run that waited for a core this share of its ready time (or more) is warned: a quiet machine gives
# it 1 / (1 - 0.3) = 1.4x the steps or more. On 2 cores that is a load of 2.9 or more, ours included
# (1 - 2 / 2.9); it was 0.5 (a load of 4) and stayed silent at the loads of 3 to 6 a user measured.
BUSY_SHARE = 0.3


class ProgressBar:
    """Seconds of --max-time for a time-limited run, else steps of --max-iters."""

    def __init__(self, config: TrainConfig, step: int, clock: float, show: bool) -> None:
        self.max_time = config.max_time
        self.postfix: dict[str, str] = {}
        if self.max_time:
            self.bar = tqdm(
                total=self.max_time, initial=min(clock, self.max_time), desc="train", disable=not show,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
            )
        else:
            self.bar = tqdm(total=config.max_iters, initial=step, desc="train", unit="step", disable=not show,
                            dynamic_ncols=True)

    def update(self, step: int, clock: float) -> None:
        if self.max_time:
            self.postfix["step"] = f"{step:,}"
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(min(clock, self.max_time) - self.bar.n)
        else:
            self.bar.update(step - self.bar.n)

    def show(self, figures: dict[str, str]) -> None:
        """Figures (loss, lr, tokens/s, MFU) to show from the next refresh on."""
        self.postfix.update(figures)
        self.bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


class CpuWait:
    """The share of its ready time this run spent waiting for a core since creation, from two readings,
    the larger kept; None where neither says.

    The threads' own (/proc/self/task/*/schedstat, `read_threads`) is exact for each thread but misses
    what a thread lost waiting for a descheduled sibling at the end of a parallel region (it sleeps or
    spins then, neither counted as waiting), and some kernels do not keep it. The machine's
    (`read_load`, the load average: threads running or ready, ours included, over `cores`) sees every
    thread wanting a core: with L of them on C cores each runs C/L of the time, so it waited 1 - C/L.
    It is read where this process may use every core (a process pinned to a few cannot tell its share
    of a whole machine's load). The kernel's averages are exponential, so the mean over the run is
    what the end's average adds to the start's (`run_load`).
    """

    def __init__(
        self, read_threads: Callable[[], tuple[int, int] | None] | None = None,
        read_load: Callable[[], tuple[float, float, float] | None] | None = None, cores: int | None | str = "detect",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read_threads = read_threads or _ran_and_waited
        self.read_load = read_load or _load_average
        self.cores = _whole_machine_cores() if cores == "detect" else cores
        self.clock = clock
        self.start, self.load_start, self.started = self.read_threads(), self.read_load(), clock()

    def share(self) -> float | None:
        readings = [r for r in (self.threads_share(), self.load_share()) if r is not None]
        return max(readings) if readings else None

    def threads_share(self) -> float | None:
        now = self.read_threads()
        if now is None or self.start is None:
            return None
        ran, waited = (max(0, b - a) for a, b in zip(self.start, now))
        return waited / (ran + waited) if ran + waited > 0 else None

    def load_share(self) -> float | None:
        end = self.read_load()
        if not self.cores or end is None or self.load_start is None:
            return None
        load = run_load(self.load_start, end, self.clock() - self.started)
        return None if load is None else max(0.0, 1.0 - self.cores / max(load, self.cores))


LOAD_WINDOWS = (60.0, 300.0, 900.0)  # the kernel's load averages: 1, 5 and 15 minutes (time constants, s)
MIN_LOAD_SECONDS = 30.0  # shorter runs: the average still says more about what ran before


def run_load(start: tuple[float, ...], end: tuple[float, ...], seconds: float) -> float | None:
    """The mean load over the last `seconds`, from the load averages at their start and at their end:
    each average moves towards the load with time constant tau, so end = start * d + mean * (1 - d),
    d = exp(-seconds / tau) (the mean weighted towards the end). The 1-minute average for runs of up
    to 5 minutes (the start has all but faded from it), the 5-minute one beyond; None for runs too
    short for either."""
    if seconds < MIN_LOAD_SECONDS:
        return None
    i = 0 if seconds < 300.0 else 1
    decay = math.exp(-seconds / LOAD_WINDOWS[i])
    return max(0.0, (end[i] - start[i] * decay) / (1.0 - decay))


def _load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # not offered here
        return None


def _whole_machine_cores() -> int | None:
    """This machine's cores, where this process may use all of them (else None: see `CpuWait`)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()
    return usable if usable == os.cpu_count() else None


def _ran_and_waited() -> tuple[int, int] | None:
    """Nanoseconds all of this process's threads have run, and waited ready to run, so far."""
    ran = waited = 0
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            run_ns, wait_ns, _ = (int(v) for v in (task / "schedstat").read_text().split())
        except (OSError, ValueError):  # a thread that has just ended, or no schedstat
            continue
        ran, waited = ran + run_ns, waited + wait_ns
    return (ran, waited) if ran else None


def busy_warning(steps: int, waited: float | None, config: TrainConfig, device_type: str) -> str:
    """The end-of-run warning for a time-limited CPU run whose threads waited for a core too long, or ""."""
    if device_type != "cpu" or not config.max_time or waited is None or waited < BUSY_SHARE or not steps:
        return ""
    quiet = steps / (1.0 - waited)
    return (f"the CPU was busy: this run's threads waited for a core {waited:.0%} of the time they were ready to "
            f"run, so {steps:,} steps where a quiet machine gives about {quiet:,.0f}; expect a weaker model than a "
            f"quiet machine trains (train again on a quieter machine, or for longer with --max-time)")
