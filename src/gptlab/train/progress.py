"""What the terminal shows of a run: a progress bar over the budget that ends it, and a word at the end
when the machine was too busy for a time budget to buy what it should.

A time-limited run's bar counts seconds of --max-time, so its ETA is the time left (a bar over
max_iters would promise `1257/100000 [04:01<5:15:34]` for a run ending in a minute). Whether the
CPU was busy is measured, not guessed: Linux counts, for every thread, the time it ran and the time it
waited, ready to run, for a core that other programs held (/proc/self/task/*/schedstat). A quiet
machine makes the threads wait almost never, however well or badly they use their cores; when they
waited more than half the time, a time-limited run took fewer than half the steps the same machine
gives when quiet, and the user should know before trusting the model.
"""

from __future__ import annotations

from pathlib import Path
from tqdm import tqdm

from .config import TrainConfig

BUSY_SHARE = 0.5  # a run whose threads waited for a core this share of their ready time (or more) is warned


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
    """The share of their ready time this process's threads spent waiting for a core, since creation;
    None where the kernel does not say (not Linux)."""

    def __init__(self) -> None:
        self.start = _ran_and_waited()

    def share(self) -> float | None:
        now = _ran_and_waited()
        if now is None or self.start is None:
            return None
        ran, waited = (max(0, b - a) for a, b in zip(self.start, now))
        return waited / (ran + waited) if ran + waited > 0 else None


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
            f"run, so {steps:,} steps where a quiet machine gives about {quiet:,.0f}; expect a weak model (train "
            f"again on a quieter machine, or for longer with --max-time)")
