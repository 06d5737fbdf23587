"""`gptlab.threads`: the thread count chosen by measurement, on a fake thread setting and fake step times."""

from __future__ import annotations


import pytest
import torch

from gptlab.threads import EXPLOIT_STEPS, EXPLORE_STEPS, ThreadTuner, inference_adapts
# -- threads chosen by measurement ----------------------------------------------------------------

class FakeThreads:
    """torch's thread setting, as ThreadTuner sees it (no real threads change)."""

    def __init__(self, most: int) -> None:
        self.now = most
        self.history: list[int] = []

    def get(self) -> int:
        return self.now

    def set(self, n: int) -> None:
        self.now = n
        self.history.append(n)


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> FakeThreads:
    fake = FakeThreads(2)
    monkeypatch.setattr(torch, "get_num_threads", fake.get)
    monkeypatch.setattr(torch, "set_num_threads", fake.set)
    return fake


def run_steps(tuner: ThreadTuner, threads: FakeThreads, seconds: dict[int, float], steps: int,
              shape=None) -> list[int]:
    used = []
    for _ in range(steps):
        tuner.before_step(shape)
        used.append(threads.now)
        tuner.after_step(seconds[threads.now])
    return used


def test_tuner_takes_the_count_whose_steps_are_fastest(threads: FakeThreads) -> None:
    said: list[str] = []
    tuner = ThreadTuner(True, said.append, name="inference threads")
    look = 2 * EXPLORE_STEPS
    used = run_steps(tuner, threads, {1: 0.1, 2: 0.26}, look + 5)  # a busy machine: one thread 2.6x faster
    assert used[:look] == [2, 1] * EXPLORE_STEPS  # the look interleaves the counts, the one in use first
    assert used[look:] == [1] * 5 and tuner.best == 1
    assert said == ["inference threads: 1 thread(s) from now on (a step took 0.1 s at 1, 0.26 s at 2)"]
    # the machine quietens: the next look (after EXPLOIT_STEPS) finds two threads faster again
    used = run_steps(tuner, threads, {1: 0.1, 2: 0.06}, EXPLOIT_STEPS - 5 + look + 3)
    assert used[-3:] == [2, 2, 2] and tuner.best == 2
    tuner.restore()
    assert threads.now == 2


def test_tuner_compares_steps_of_one_shape_only(threads: FakeThreads) -> None:
    tuner = ThreadTuner(True, lambda _: None)
    # two threads run the big shape faster; each big step takes longer than any small step at either count
    for step in range(40):
        shape = "big" if step % 2 else "small"
        tuner.before_step(shape)
        n = threads.now
        tuner.after_step({("small", 1): 0.01, ("small", 2): 0.02, ("big", 1): 2.0, ("big", 2): 1.0}[shape, n])
        if not tuner.looking:
            break
    assert tuner.best == 1  # the small shape finished its look first (it came first): 1 thread wins there
    assert not tuner.looking


def test_tuner_is_off_when_disabled_or_with_one_thread(threads: FakeThreads, monkeypatch) -> None:
    for tuner in (ThreadTuner(False, print), ):
        run_steps(tuner, threads, {2: 0.1}, 10)
        assert threads.history == [] and not tuner.active
    threads.now = 1
    tuner = ThreadTuner(True, print)
    run_steps(tuner, threads, {1: 0.1}, 10)
    assert threads.history == [] and not tuner.active
    monkeypatch.setenv("GPTLAB_ADAPT_THREADS", "0")
    assert not inference_adapts("cpu")
    monkeypatch.setenv("GPTLAB_ADAPT_THREADS", "")
    assert inference_adapts("cpu") and not inference_adapts("meta")
