"""What `--resume` needs to continue a run as if it had never stopped, and how it reaches the disk.

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

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import GptlabError
from .fileio import atomic_write

STATE_FILE = "training_state.pt"
STATE_VERSION = 2  # 2: schedule_start
# What the trainer saves (train.py's _checkpoint) and needs back to resume.
STATE_KEYS = (
    "step", "tokens_seen", "elapsed", "schedule_start", "best_val_loss", "last_eval_step", "model_config", "model", "optimizer",
    "scaler", "data_rng", "process_rng",
)


def save_training_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / STATE_FILE, lambda handle: torch.save({"version": STATE_VERSION, **state}, handle))


def load_training_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise GptlabError(f"{run_dir}: no {STATE_FILE} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip or pickle
        raise GptlabError(f"{path}: cannot read the training state ({exc})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise GptlabError(
            f"{path}: training state format {found!r}, expected {STATE_VERSION}; this gptlab cannot resume it"
        )
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise GptlabError(f"{path}: the training state lacks {', '.join(missing)}; it is damaged and cannot be resumed")
    return state


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
