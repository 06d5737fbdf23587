"""`gptlab train --eval-tasks`: lm-eval task scores logged while training, as llm.c and modded-nanogpt
log HellaSwag. Which evaluations score the tasks, and how scoring stays out of training's way, are
training's business; running the tasks is evaluate/tasks.py's, which knows nothing of training."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..evaluate.tasks import parse_tasks, run_tasks
from ..model import GPT
from ..tokenizers import Tokenizer
from .config import TrainConfig


def tasks_due(config: TrainConfig, step: int) -> bool:
    """Score the tasks at this evaluation? (every one, or those whose step --eval-tasks-every divides)."""
    return bool(config.eval_tasks) and (config.eval_tasks_every == 0 or step % config.eval_tasks_every == 0)


def task_scores(model: GPT, tokenizer: Tokenizer, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """The training model's `task/metric` scores.

    lm-eval seeds Python's, numpy's and torch's global generators; their states are put back, so
    scoring tasks never changes what training draws next. No bootstrapped standard errors: lm-eval
    computes them in a pool of processes forked from this one, and a child forked from a training
    process (its OpenMP and other threads mid-work) deadlocked.
    """
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        return run_tasks(parse_tasks(config.eval_tasks), model=model, tokenizer=tokenizer, device=device,
                         limit=config.eval_tasks_limit or None, include_path=config.eval_tasks_path or None,
                         bootstrap_iters=0).metrics()
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
