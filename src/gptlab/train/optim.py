"""Optimizers and learning-rate schedules.

Every optimizer is torch's own, built over the same two parameter groups, so a comparison between
them changes one thing only (muon splits the decayed group in two, see `MuonWithAdamW`). Every
schedule warms up and peaks at `--lr`, so `--lr` means the same thing whichever schedule and
optimizer a run uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import TrainConfig
from ..model import GPT


def learning_rate(step: float, config: TrainConfig) -> float:
    """The learning rate at schedule position `step` (0-based optimizer steps; fractional on the clock
    of --decay-by-time, see `schedule_position`) under `config.schedule`.

    cosine, linear: linear warmup to `lr` over `warmup_steps(config)`, then decay to `min_lr` at
    `lr_decay_iters` (default `max_iters`), then flat. constant: the same warmup, then `lr`.
    noam: Vaswani et al. (2017), `d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)` with s = step + 1,
    rescaled so that its peak (at s = warmup) is `lr`: the paper's absolute values are
    `--lr` = (d_model * warmup)^-0.5. It ignores `min_lr` and `lr_decay_iters`.
    """
    warmup = warmup_steps(config)
    if config.schedule == "noam":
        warmup = max(1.0, warmup)
        return config.lr * noam_rate(step + 1, config.n_embd, warmup) / noam_rate(warmup, config.n_embd, warmup)
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return config.lr
    decay_iters = decay_steps(config)
    if step >= decay_iters:
        return config.min_lr
    progress = (step - warmup) / max(1.0, decay_iters - warmup)  # 0 -> 1
    if config.schedule == "linear":
        return config.lr - progress * (config.lr - config.min_lr)
    if config.schedule == "cosine":
        return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def decay_steps(config: TrainConfig) -> int:
    """Where the decay ends: `lr_decay_iters`, or `max_iters` when it is 0."""
    return config.lr_decay_iters or config.max_iters


def warmup_steps(config: TrainConfig) -> float:
    """The warm-up's length in schedule steps: `warmup_iters`, or `warmup_fraction` of the decay's steps."""
    return config.warmup_fraction * decay_steps(config) if config.warmup_fraction else float(config.warmup_iters)


def schedule_position(step: int, seconds: float, start: float | None, config: TrainConfig) -> float:
    """Where the schedule stands after `step` optimizer steps and `seconds` of training.

    Counted in steps; with --decay-by-time, on the clock: the share of the time budget used since
    `start` (the clock when the run's first step ended, None before), mapped onto the schedule's
    `decay_steps`. The warm-up and the decay then both run on the clock: the warm-up takes its share of
    the time (a slow machine warms up in fewer steps, not for longer) and the decay ends exactly as the
    budget does. The first step is left out because it may compile the model (half a minute on a CPU)
    and would otherwise use up the warm-up before a second step is taken. The price of the clock: such
    a run cannot be repeated (or resumed) step for step.
    """
    if not config.decay_by_time:
        return float(step)
    if start is None:
        return 0.0
    span = config.max_time - start
    used = 1.0 if span <= 0 else min(1.0, max(0.0, (seconds - start) / span))
    return used * decay_steps(config)


def noam_rate(s: float, d_model: int, warmup: float) -> float:
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
    if config.optimizer == "muon":
        return MuonWithAdamW(groups, hidden_matrices(model), config, speed)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def hidden_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The weight matrices inside the transformer blocks: attention's and the MLP's projections.

    The embeddings are lookups, not maps between hidden states, and the tied one is the output layer
    too; Muon's orthogonalised update is meant for neither (Jordan et al., 2024).
    """
    return [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]


class MuonWithAdamW:
    """Muon (torch.optim.Muon) for the hidden matrices, AdamW for the rest, stepped as one optimizer.

    Muon replaces each matrix's momentum by the nearest semi-orthogonal matrix (5 Newton-Schulz
    iterations), so every direction of the update moves by the same amount; it takes fewer steps than
    AdamW to a given loss, for a few small products per matrix and step. `adjust_lr_fn="match_rms_adamw"`
    (Liu et al., 2025, "Muon is Scalable for LLM Training") scales its update to AdamW's RMS, so one
    `--lr`, one schedule and one `--weight-decay` serve both halves. Muon keeps torch's momentum (0.95,
    Nesterov); `beta1` and `beta2` are AdamW's. The training loop sees `param_groups`, `step`,
    `zero_grad`, `state_dict` and `load_state_dict`, as for any torch optimizer.
    """

    def __init__(
        self, groups: list[dict], hidden: list[torch.nn.Parameter], config: TrainConfig, speed: dict[str, bool]
    ) -> None:
        """`groups` as `parameter_groups` makes them; `hidden`, the decayed matrices that Muon takes."""
        hidden = {id(p) for p in hidden}
        decayed, plain = groups
        self.muon = torch.optim.Muon(
            [p for p in decayed["params"] if id(p) in hidden], lr=config.lr, weight_decay=config.weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        decayed["params"] = [p for p in decayed["params"] if id(p) not in hidden]  # the embeddings
        self.adamw = torch.optim.AdamW([decayed, plain], lr=config.lr, betas=(config.beta1, config.beta2), **speed)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
