"""Optimizers and learning-rate schedules.

Every optimizer is torch's own, built over the same two parameter groups, so a comparison between
them changes one thing only. Every schedule warms up and peaks at `--lr`, so `--lr` means the same
thing whichever schedule a run uses.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .model import GPT


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) under `config.schedule`.

    cosine, linear: linear warmup to `lr`, then decay to `min_lr` at `lr_decay_iters` (default
    `max_iters`), then flat. constant: the same warmup, then `lr`.
    noam: Vaswani et al. (2017), `d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)` with s = step + 1,
    rescaled so that its peak (at s = warmup) is `lr`: the paper's absolute values are
    `--lr` = (d_model * warmup)^-0.5. It ignores `min_lr` and `lr_decay_iters`.
    """
    if config.schedule == "noam":
        warmup = max(1, config.warmup_iters)
        return config.lr * noam_rate(step + 1, config.n_embd, warmup) / noam_rate(warmup, config.n_embd, warmup)
    if step < config.warmup_iters:
        return config.lr * (step + 1) / (config.warmup_iters + 1)
    if config.schedule == "constant":
        return config.lr
    decay_iters = config.lr_decay_iters or config.max_iters
    if step >= decay_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)  # 0 -> 1
    if config.schedule == "linear":
        return config.lr - progress * (config.lr - config.min_lr)
    if config.schedule == "cosine":
        return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def noam_rate(s: int, d_model: int, warmup: int) -> float:
    """The schedule of "Attention Is All You Need", eq. 3, for 1-based step s."""
    return d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)


def parameter_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Matrices are decayed; biases and LayerNorm gains are not.

    Shrinking a bias or a gain towards zero has no regularising meaning. The tied token embedding is a
    matrix and *is* decayed, as in nanoGPT and GPT-2 practice; the positional embedding likewise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def configure_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`config.optimizer`, torch's implementation, over `parameter_groups`.

    adamw decouples weight decay from the gradient (Loshchilov & Hutter); adam and radam apply it the
    classic way, as an L2 term added to the gradient, which is torch's default for them and the very
    difference AdamW was introduced to remove. sgd uses momentum `beta1`.
    """
    groups = parameter_groups(model, config.weight_decay)
    # torch's fused kernels (one pass over each tensor) exist on CPU and CUDA; measured here they run
    # AdamW 3x faster than the multi-tensor (foreach) path (benchmarks/train.py); elsewhere, foreach
    speed = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    betas = (config.beta1, config.beta2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, **speed)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=betas, **speed)
    if config.optimizer == "radam":
        return torch.optim.RAdam(groups, lr=config.lr, betas=betas, foreach=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.beta1, **speed)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")
