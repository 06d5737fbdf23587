"""The model's mode while it is read rather than trained: one context manager for every reader
(generation, scoring, attention maps, the optimizer's timing, training's evaluations)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the block without dropout, then give the model back in the mode it had, even on an error.

    A model already in eval mode is left untouched: the engine enters this on every step, and a
    caller's model is never switched under it."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()
