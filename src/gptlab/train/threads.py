"""`--adapt-threads`: keep a CPU run at the thread count that steps fastest now, as other programs come
and go.

A step's parallel regions wait for their slowest thread. On a quiet machine two threads on two cores
beat one; when other programs hold the cores, a thread descheduled for a time slice stalls the rest,
and one thread ran a step 3 to 4 times faster than two here (the demo's model at load 5: 1.0 s
against 3.5 s). No setting is right for both, and the load changes during a run, so the step is
timed: every EXPLOIT_STEPS steps each thread count runs EXPLORE_STEPS steps, and the count with the
lowest median step time runs until the next look. The numbers of a step depend on the thread count
in their last bits, so an adapted run is not repeatable step for step (nor is a run whose schedule
follows the clock, which is when adapting pays).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

EXPLORE_STEPS = 3  # steps timed at each thread count in a look
EXPLOIT_STEPS = 40  # steps at the fastest count between looks


class ThreadTuner:
    """Chooses the thread count of each step from the times of earlier steps; inactive (it never
    changes torch's setting) unless enabled with more than one thread to choose from."""

    def __init__(self, enabled: bool, say: Callable[[str], None]) -> None:
        most = torch.get_num_threads()
        self.counts = list(range(1, most + 1)) if enabled and most > 1 else []
        self.best = self.current = most
        self.say = say
        self.look: list[int] = []  # the thread counts of the look's remaining steps
        self.times: dict[int, list[float]] = {}  # the look's step times, by thread count
        self.exploit_left = 0
        self.timing = False

    def before_step(self) -> None:
        if not self.counts:
            return
        if not self.look and not self.exploit_left:
            self.look = [n for n in self.counts for _ in range(EXPLORE_STEPS)]
            self.times = {n: [] for n in self.counts}
        self.timing = bool(self.look)
        if self.timing:
            self.current = self.look.pop(0)
        else:
            self.current = self.best
            self.exploit_left -= 1
        torch.set_num_threads(self.current)

    def after_step(self, seconds: float) -> None:
        """The time of the step `before_step` prepared."""
        if not self.timing:
            return
        self.times[self.current].append(seconds)
        if self.look:
            return
        medians = {n: statistics.median(t) for n, t in self.times.items()}
        best = min(medians, key=medians.__getitem__)
        if best != self.best:
            timings = ", ".join(f"{medians[n]:.2f} s at {n}" for n in sorted(medians))
            self.say(f"--adapt-threads: {best} thread(s) from now on (a step took {timings})")
        self.best = best
        self.exploit_left = EXPLOIT_STEPS
