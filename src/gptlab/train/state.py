"""`TrainState`: everything `--resume` needs to continue a run as if it had never stopped. It *is* the
checkpoint: its fields are the checkpoint's keys, saved and restored by one loop over them.

Exact continuation needs more than the weights: the optimizer's moments, the step (which fixes the
learning rate), the generator that draws the batches and the position it has reached, and every
other random state a step may touch (dropout draws from torch's; numpy's and Python's are saved too,
for anything a user hooks in). Everything lives in one file, `training_state.pt`, model weights
included, because one file can be replaced atomically and a set of files cannot: a process killed
between writing the weights and writing the optimizer would otherwise leave a pair from two different
steps. The run directory's `model.safetensors` is the same model again, for everything that reads a
Hugging Face checkpoint; resuming never depends on it.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import read_torch_file
from ..errors import GptlabError, first_line
from ..fileio import atomic_write
from ..lora import load_trainable_state, trainable_state
from ..model import GPT
from .device import out_of_memory

STATE_FILE = "training_state.pt"
STATE_VERSION = 2  # 2: schedule_start
# Saved beside TrainState's fields: the model's shape (to rebuild it before its weights are loaded) and
# every process's random states (gathered from all processes at each checkpoint).
EXTRA_KEYS = ("model_config", "process_rng")


@dataclass
class TrainState:
    """The live objects and counters of a run. An object field is saved as its `state_dict()` (the
    generator: its bit generator's state), a counter as its value."""

    model: GPT
    optimizer: Any  # a torch optimizer, or optim.MuonWithAdamW
    scaler: torch.amp.GradScaler
    data_rng: np.random.Generator  # draws every training batch
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds of training (the --max-time clock), all sessions, up to the checkpoint
    schedule_start: float | None = None  # the clock when the first step ended (--decay-by-time starts there)
    best_val_loss: float = math.inf
    last_eval_step: int = 0

    def checkpoint(self, process_rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint: every field, plus EXTRA_KEYS."""
        saved: dict[str, Any] = {"version": STATE_VERSION, "model_config": self.model.config.to_dict(),
                                 "process_rng": process_rng}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.random.Generator):
                saved[f.name] = value.bit_generator.state
            elif isinstance(value, GPT):  # a LoRA run keeps its adapter only: the base is --init-from
                saved[f.name] = trainable_state(value)
            elif hasattr(value, "state_dict"):
                saved[f.name] = value.state_dict()
            else:
                saved[f.name] = value
        return saved

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Put a checkpoint's values back into the fields (the objects load theirs in place)."""
        for f in fields(self):
            value, saved = getattr(self, f.name), checkpoint[f.name]
            if isinstance(value, np.random.Generator):
                value.bit_generator.state = saved
            elif isinstance(value, GPT):
                load_trainable_state(value, saved)
            elif hasattr(value, "load_state_dict"):
                value.load_state_dict(saved)
            else:
                setattr(self, f.name, saved)


def checkpoint_keys() -> tuple[str, ...]:
    return (*(f.name for f in fields(TrainState)), *EXTRA_KEYS)


def save_checkpoint(run_dir: Path, checkpoint: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / STATE_FILE, lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint in `run_dir`, checked for this gptlab's format and every key TrainState needs."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise GptlabError(f"{run_dir}: no {STATE_FILE} to resume from")
    state = read_torch_file(path, "training state")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise GptlabError(
            f"{path}: training state format {found!r}, expected {STATE_VERSION}; this gptlab cannot resume it"
        )
    missing = [key for key in checkpoint_keys() if key not in state]
    if missing:
        raise GptlabError(f"{path}: the training state lacks {', '.join(missing)}; it is damaged and cannot be resumed")
    return state


@contextlib.contextmanager
def unusable_checkpoint(run_dir: Path) -> Iterator[None]:
    """Entries that do not fit this gptlab's model or optimizer: one line, not a traceback."""
    try:
        yield
    except (GptlabError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        if out_of_memory(exc):
            raise
        raise GptlabError(f"{Path(run_dir) / STATE_FILE}: cannot resume from this training state "
                          f"({first_line(exc)})") from None


def process_rng_state() -> dict[str, Any]:
    """This process's random states: torch (CPU and CUDA), numpy's global generator, Python's `random`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def restore_process_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
