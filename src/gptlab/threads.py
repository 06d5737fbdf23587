"""Keep a CPU process at the thread count that runs its steps fastest now, as other programs come and go.

A step's parallel regions wait for their slowest thread. On a quiet machine two threads on two cores
beat one; when other programs hold the cores, a thread descheduled for a time slice stalls the rest,
and one thread ran a step 3 to 4 times faster than two here (the demo's model at load 5: 1.0 s
against 3.5 s in training; sampling 500 characters took 23.7 s at two threads against 9.2 s at one on
an AVX2 machine at load 5). No setting is right for both, and the load changes during a run, so the
steps are timed: every EXPLOIT_STEPS steps a look times EXPLORE_STEPS steps at each thread count
(interleaved, so that a change of load during the look touches every count alike), and the count with
the lowest median step time runs until the next look.

Training (`--adapt-threads`), the inference engine's decoding steps (sample, serve, the Python API) and
the scorer's batches (eval) use it. Steps of different shapes (a decoding batch of 1 or of 16 rows)
take different times, so a look compares only steps of one shape; steps of other shapes run at the
chosen count untimed. The numbers of a step depend on the thread count in their last bits (the kernels
are chosen per thread count), so an adapted run is not repeatable bit for bit. Inference adapts by
default on a CPU with more than one thread; GPTLAB_ADAPT_THREADS=0 keeps torch's thread count.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Hashable

import torch

EXPLORE_STEPS = 3  # steps timed at each thread count in a look
EXPLOIT_STEPS = 40  # steps at the fastest count between looks
LOOK_PATIENCE = 4  # a look that has not timed one shape at every count after this many rounds gives up
ENV = "GPTLAB_ADAPT_THREADS"


def inference_adapts(device: torch.device | str) -> bool:
    """Whether inference on `device` adapts its thread count: on a CPU, unless GPTLAB_ADAPT_THREADS is 0/off."""
    setting = os.environ.get(ENV, "").strip().lower()
    return torch.device(device).type == "cpu" and setting not in ("0", "off", "false", "no")


class ThreadTuner:
    """Chooses the thread count of each step from the times of earlier steps; inactive (it never
    changes torch's setting) unless enabled with more than one thread to choose from."""

    def __init__(self, enabled: bool, say: Callable[[str], None], *, name: str = "--adapt-threads") -> None:
        self.initial = most = torch.get_num_threads()
        self.counts = list(range(1, most + 1)) if enabled and most > 1 else []
        self.best = self.current = most
        self.say = say
        self.name = name
        self.looking = False
        self.look_steps = 0  # timed steps in the current look
        self.times: dict[Hashable, dict[int, list[float]]] = {}  # the look's step times, by shape and thread count
        self.exploit_left = 0
        self.timing = False
        self.shape: Hashable = None

    @property
    def active(self) -> bool:
        return bool(self.counts)

    def before_step(self, shape: Hashable = None) -> None:
        """Set torch's thread count for the next step, of this `shape` (steps of one shape are compared)."""
        if not self.counts:
            return
        if not self.looking and not self.exploit_left:
            self.looking, self.look_steps, self.times = True, 0, {}
        if self.looking:
            times = self.times.setdefault(shape, {n: [] for n in self.counts})
            # the count this shape has been timed at least (the one in use first): counts interleave
            self.current = min(self.counts, key=lambda n: (len(times[n]), n != self.best, n))
            self.timing, self.shape = True, shape
        else:
            self.current, self.timing = self.best, False
            self.exploit_left -= 1
        if torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)

    def after_step(self, seconds: float) -> None:
        """The time of the step `before_step` prepared."""
        if not self.timing:
            return
        self.timing = False
        times = self.times[self.shape]
        times[self.current].append(seconds)
        self.look_steps += 1
        if all(len(t) >= EXPLORE_STEPS for t in times.values()):
            medians = {n: statistics.median(t) for n, t in times.items()}
            best = min(medians, key=medians.__getitem__)
            if best != self.best:
                timings = ", ".join(f"{medians[n]:.3g} s at {n}" for n in sorted(medians))
                self.say(f"{self.name}: {best} thread(s) from now on (a step took {timings})")
            self.best = best
        elif self.look_steps < LOOK_PATIENCE * EXPLORE_STEPS * len(self.counts):
            return  # the look goes on
        self.looking, self.exploit_left = False, EXPLOIT_STEPS

    def restore(self) -> None:
        """Give torch back the thread count it had before (between runs of an engine, so that a library
        caller finds the setting it made)."""
        if self.counts and torch.get_num_threads() != self.initial:
            torch.set_num_threads(self.initial)
