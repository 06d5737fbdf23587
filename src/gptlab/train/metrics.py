"""metrics.jsonl, the run's log of every step and evaluation, and loss.png drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from ..fileio import atomic_write_bytes, atomic_write_via, environment_errors


class MetricsLog:
    """Rank 0's append-only log: one JSON line per step (its lr, and its loss every log_interval
    steps) and one per evaluation. Other processes log nothing (path None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            with environment_errors(path):
                self._file = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            with environment_errors(self.path):
                self._file.write(json.dumps(row) + "\n")
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows a killed run logged after its last checkpoint: the resumed run logs them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _logged_step(line: str) -> float:
    """The step of one metrics line; a line cut short by a killed process counts as the future."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (batch)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_via(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
