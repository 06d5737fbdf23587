"""One training run: set up (setup.py), fit (loop.py), then finish (the loss plot and report.md)."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import EnvironmentProblem
from . import distributed
from .config import TrainConfig
from .device import autocast_context, out_of_memory
from .loop import Loop
from .metrics import plot_losses
from .progress import busy_warning
from .report import write_report
from .run_dir import METRICS_FILE
from .setup import setup



@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    seconds: float  # of training, what --max-time counts: steps, periodic evaluations and checkpoints
    tokens_seen: int
    config: TrainConfig  # as the run used it: the data path, the dtype and the shape resolved
    stopped_by: str = ""  # "SIGINT" or "SIGTERM" when a signal ended the run early, after a checkpoint
    finish_seconds: float = 0.0  # this session's final evaluation, checkpoint, loss plot and report
    warning: str = ""  # what the user should know before trusting the model (a busy CPU)


def train(
    config: TrainConfig, *, overwrite: bool = False, resume: bool = False, show_progress: bool = True
) -> TrainResult:
    """Train one model as `config` says and return where it went and how well it did.

    Under torchrun every process calls this; rank 0 alone shows progress and writes the run directory.
    """
    device = resolve_device(config.device)
    if config.dtype != "auto":
        autocast_context(device, config.dtype)  # refuse an impossible dtype before touching the run directory
    group = distributed.setup(device)
    run = loop = None
    try:
        device = distributed.process_device(device, group)
        run = setup(config, group, device, overwrite=overwrite, resume=resume, show_progress=show_progress)
        loop = Loop(run, show_progress)
        stopped_by = loop.fit()
        trained = loop.clock
        result = TrainResult(run.run_dir, run.state.step, loop.losses["train"], loop.losses["val"],
                             run.state.best_val_loss, trained, run.state.tokens_seen, run.config, stopped_by)
        if stopped_by:
            return result
        result.warning = busy_warning(loop.session_steps, loop.cpu_wait.share(), run.config, device.type)
        if group.is_main:
            plot_losses(run.run_dir / METRICS_FILE, run.run_dir / "loss.png")
            if show_progress:
                print("writing report.md: scoring the model and a Kneser-Ney bigram on the validation split",
                      file=sys.stderr)
            write_report(result, run.config, run.state.model, run.dataset, device)
        distributed.barrier(group)
        result.finish_seconds = loop.elapsed() - trained
        return result
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise EnvironmentProblem(
            f"out of memory on {device}; choose a smaller --batch-size (a larger --grad-accum keeps the batch), "
            f"--block-size or model"
        ) from None
    finally:
        if run is not None:
            run.close()
        # DDP sits in a reference cycle of torch's own, so its reducer (and the gloo state it holds)
        # would wait for the cyclic collector, perhaps until interpreter shutdown, after the process
        # group is gone, where gloo's teardown can abort the process (seen once: exit 134 after a
        # SIGTERM). Free it now, while the group is alive.
        del run, loop
        if group.active:
            gc.collect()
        distributed.teardown(group)
