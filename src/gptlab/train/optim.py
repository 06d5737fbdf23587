"""Optimizers and learning-rate schedules.

Every optimizer is torch's own, built over the same two parameter groups, so a comparison between
them changes one thing only (muon splits the decayed group in two, see `MuonWithAdamW`). Every
schedule warms up and peaks at `--lr`, so `--lr` means the same thing whichever schedule and
optimizer a run uses.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.optim._muon as torch_muon

from .config import TrainConfig
from .device import autocast_context
from ..inference.modes import eval_mode
from ..model import GPT
from ..precision import bf16_native, fast_bf16, interleaved_speedup, product_rate


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


def configure_optimizer(
    model: GPT, config: TrainConfig, device: torch.device, muon_dtype: torch.dtype | None = None
) -> torch.optim.Optimizer:
    """`config.optimizer`, torch's implementation, over `parameter_groups`.

    adamw decouples weight decay from the gradient (Loshchilov & Hutter); adam and radam apply it the
    classic way, as an L2 term added to the gradient, which is torch's default for them and the very
    difference AdamW was introduced to remove. sgd uses momentum `beta1`. Muon's Newton-Schulz
    iterations run in `muon_dtype`, by default what `muon_iteration_dtype` measures here.
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
        hidden = hidden_matrices(model)
        dtype = muon_dtype or muon_iteration_dtype(hidden, device)
        return MuonWithAdamW(groups, hidden, config, speed, dtype)
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

    torch's Muon runs its iterations in bf16, a fast path where the device has bf16 in hardware and 10
    to 50 times slower than float32 where a CPU emulates it (AVX2: Muon's step took 1.2 s against 0.13 s
    for the forward and backward passes). `iteration_dtype` float32 runs the same iterations in float32
    (`newton_schulz`) instead; `muon_iteration_dtype` measures which of the two this device runs faster.
    """

    def __init__(
        self, groups: list[dict], hidden: list[torch.nn.Parameter], config: TrainConfig, speed: dict[str, bool],
        iteration_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        """`groups` as `parameter_groups` makes them; `hidden`, the decayed matrices that Muon takes."""
        self.iteration_dtype = iteration_dtype
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
        with iterations_in(self.iteration_dtype):
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


# --- Muon's cost, measured where it runs ------------------------------------------------------------

# Muon is kept where its step adds at most this share of the rest of a training step (forward,
# backward and AdamW's step). Measured points on either side: on 2 CPU cores with bf16 in hardware Muon
# costs a tenth of the tokens per second and wins by far (shakespeare-char-cpu, 5 minutes: validation
# loss 1.470 against AdamW's 1.506 to 1.526); on an AVX2 CPU, its bf16 iterations emulated, it made the
# step 9x slower and lost by far (the demo at load 3 to 6: 150 steps and perplexity 12 against AdamW's
# 1,295 steps and 6.36). Doubling the step is a judgement between the two, set wide because the
# measurement is short and a busy machine slows Muon's many small products more than the rest (on 2
# busy cores: 0.8 s against 0.95 s for the forward and backward passes, where it is 0.03 s quiet).
MUON_MAX_OVERHEAD = 1.0


def newton_schulz(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `grad`, nearly: torch's (and Keller Jordan's) quintic
    Newton-Schulz iteration, computed in `dtype` (torch's own is fixed to bf16). The result is in `dtype`."""
    a, b, c = ns_coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T  # (m, n) with m <= n: the Gram matrix is the smaller one
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T  # (m, m)
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b * A + c * A @ A
        x = torch.addmm(x, update, x, beta=a)  # a * X + (b * A + c * A^2) @ X
    return x.T if tall else x


@contextlib.contextmanager
def iterations_in(dtype: torch.dtype) -> Iterator[None]:
    """torch.optim.Muon's steps inside run their Newton-Schulz iterations in `dtype` (bf16: torch's own).

    torch's Muon calls its module's `_zeropower_via_newtonschulz` by name at every step, so swapping it
    for the length of a step changes the iterations' dtype and nothing else of torch's Muon (momentum,
    learning-rate scaling, weight decay). tests/train/test_optim.py checks that `newton_schulz` in bf16 gives
    torch's result bit for bit, so a torch that changes its iteration is noticed.
    """
    if dtype == torch.bfloat16:
        yield
        return
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = functools.partial(newton_schulz, dtype=dtype)
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original


def newton_schulz_shapes(hidden: list[torch.nn.Parameter]) -> tuple[tuple[int, int, int], ...]:
    """The products (m, k, n) one Muon step runs on these matrices: per matrix of m <= n, X X^T,
    A A (m x m) and B X (m x n), each distinct shape once."""
    shapes = set()
    for p in hidden:
        m, n = sorted(p.shape)
        shapes |= {(m, n, m), (m, m, m), (m, m, n)}
    return tuple(sorted(shapes))


def muon_iteration_dtype(
    hidden: list[torch.nn.Parameter], device: torch.device, speedup: Callable[[], float] | None = None
) -> torch.dtype:
    """bf16 where this device has it in hardware and runs Muon's products in it faster than in float32
    (`speedup`: bf16's rate over float32's, measured on `newton_schulz_shapes` unless given); else
    float32. Nothing is timed where bf16 is not native."""
    if not bf16_native(device):
        return torch.float32
    shapes = newton_schulz_shapes(hidden)
    measure = speedup or (lambda: _shapes_speedup(str(device), shapes))
    return torch.bfloat16 if fast_bf16(device, measure) else torch.float32


@functools.cache
def _shapes_speedup(device: str, shapes: tuple[tuple[int, int, int], ...]) -> float:
    return interleaved_speedup(lambda dtype: product_rate(device, dtype, shapes))


@dataclass(frozen=True)
class MuonCost:
    """Seconds of one training step's parts, measured: Muon's step over the hidden matrices (its
    iterations in `dtype`), AdamW's step over the same matrices, and the step's forward and backward passes."""

    dtype: torch.dtype
    muon: float
    adamw: float
    forward_backward: float

    @property
    def pays(self) -> bool:
        """Whether Muon adds at most MUON_MAX_OVERHEAD of the rest of the step."""
        return self.muon - self.adamw <= MUON_MAX_OVERHEAD * (self.forward_backward + self.adamw)

    def describe(self) -> str:
        return (f"Muon's step ({str(self.dtype).removeprefix('torch.')} iterations) takes {self.muon * 1e3:,.0f} ms, "
                f"AdamW's {self.adamw * 1e3:,.0f} ms, the forward and backward passes {self.forward_backward * 1e3:,.0f} ms")


def measure_muon_cost(
    model: GPT, config: TrainConfig, device: torch.device, micro_steps: int, dtype: torch.dtype, repeats: int = 5
) -> MuonCost:
    """Time Muon's and AdamW's steps on copies of the hidden matrices, and `micro_steps` forward and
    backward passes of `model` (without dropout) on random tokens at one micro-batch in the run's dtype:
    each the best of `repeats` interleaved rounds after one untimed run. The model's weights, gradients, mode and the
    random states are left as they were."""
    hidden = hidden_matrices(model)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in hidden]
    generator = torch.Generator().manual_seed(0)
    for p in copies:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    muon = torch.optim.Muon(copies, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw")
    speed = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    adamw = torch.optim.AdamW(copies, lr=config.lr, **speed)

    def muon_step() -> None:
        with iterations_in(dtype):
            muon.step()

    x = torch.randint(model.config.vocab_size, (config.batch_size, config.block_size), generator=generator).to(device)
    grads = [p.grad for p in model.parameters()]  # set aside: the passes below must not add to them
    for p in model.parameters():
        p.grad = None

    def forward_backward() -> None:
        for _ in range(micro_steps):
            with autocast_context(device, config.dtype):
                loss = model(x, x).loss
            loss.backward()

    parts = (muon_step, adamw.step, forward_backward)
    # no dropout draws (a measurement, not a training micro-batch); autograd runs as in training
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for part in parts:  # untimed: first-call costs
            part()
        best = [math.inf] * len(parts)
        for _ in range(repeats):  # interleaved, so that a busy moment does not fall on one part only
            best = [min(b, _time(part, device)) for b, part in zip(best, parts)]
    cost = MuonCost(dtype, *best)
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    return cost


def _time(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
