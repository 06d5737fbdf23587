"""How fast training runs: model FLOPs per token, the device's measured matmul peak, and MFU.

Model-FLOPs utilisation (MFU) is the FLOP rate the model's arithmetic needs at the measured token rate,
divided by the rate this device reaches on the model's own weight products (`matmul_peak`: the step's
forward and backward shapes at the run's batch, each the fastest of several timings). The numerator
counts only the matrix multiplies the architecture requires, so LayerNorm, softmax, GELU, the optimizer
and any recomputation make MFU lower, never higher; and since the peak is a rate the same products
reach, MFU cannot pass 100% unless the probe was slowed down, which `ThroughputMeter` corrects.

FLOPs per token of one training step (forward + backward), for L layers of width C, context T and a
vocabulary of V:

    6 * N_matmul + 12 * L * T * C,   N_matmul = L * 12 * C^2 + V * C

A weight matrix of n entries costs 2n FLOPs per token forward (a multiply and an add per entry) and 4n
backward (the gradient of its input and of itself), hence 6 per entry. Each layer's matrices hold
12 C^2 entries (3C^2 for the fused query/key/value projection, C^2 for the output projection, 4C^2
each for the two MLP matrices); the tied output head adds V * C. The token and position embeddings
are lookups, biases and LayerNorm gains are element-wise: none of them is a matrix multiply.
Attention adds two products per layer whose size grows with the context, Q K^T and (weights) V,
2 * T * C FLOPs each per token forward, so 12 * L * T * C forward and backward. T is the full window,
the convention of Chowdhery et al. (2022, PaLM, appendix B): a causal kernel may skip the masked half.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .config import GPTConfig


def matmul_parameters(config: GPTConfig) -> int:
    """Entries of the weight matrices that take part in a matrix multiply (the tied head once)."""
    return config.n_layer * 12 * config.n_embd**2 + config.vocab_size * config.n_embd


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (forward and backward) per token for windows of `seq_len` (default: the context)."""
    T = seq_len or config.block_size
    return 6.0 * matmul_parameters(config) + 12.0 * config.n_layer * T * config.n_embd


@dataclass(frozen=True)
class Product:
    """One weight product of a training step on `rows` tokens, run `count` times per step."""

    rows: int
    fan_in: int
    fan_out: int
    count: int
    kind: str  # "forward" x @ W^T, "input grad" dY @ W, or "weight grad" dY^T @ x

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.fan_in * self.fan_out


def step_products(config: GPTConfig, rows: int) -> list[Product]:
    """The weight products one training step on `rows` = B * T tokens runs, forward and backward.

    Each of a block's four linear layers (c_attn C -> 3C, attn.c_proj C -> C, c_fc C -> 4C, mlp.c_proj
    4C -> C) runs once per layer, the LM head C -> V once. Autograd computes the gradient of a layer's
    input as dY @ W and that of its weight as dY^T @ x: products of other shapes than the forward one.
    """
    C, L = config.n_embd, config.n_layer
    layers = [(C, 3 * C, L), (C, C, L), (C, 4 * C, L), (4 * C, C, L), (C, config.vocab_size, 1)]
    return [
        Product(rows, fan_in, fan_out, count, kind)
        for fan_in, fan_out, count in layers for kind in ("forward", "input grad", "weight grad")
    ]


PROBE_ROWS = 2048  # B * T of the probe when the caller names no batch
PRODUCT_FLOPS = 2.0**32  # the probe shrinks M (never below MIN_ROWS) so that no product costs more
MIN_ROWS = 256
START_ROWS = 32  # the first, smallest warm-up pass


def matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 0.25, *,
    config: GPTConfig | None = None, rows: int | None = None,
) -> float:
    """FLOP/s this device reaches on the model's own products, the best of repeated timings of each.

    The products are `step_products(config, rows)`: the step's forward and backward matrix shapes
    (default: GPT-2 124M at 2048 tokens), in `dtype`. A square product of one size can run far faster
    or slower than the thin, wide and tall ones a model runs, so it would misstate the attainable peak
    and so MFU. Each product's fastest of several runs counts (other work on the machine only adds
    time), and the peak is the step's products' FLOPs over the time they take at those rates.

    The rows start at a sixteenth and double up to the model's while the next pass over the products
    fits in `seconds`, so the probe stays short where a dtype is emulated in software and 100x slower;
    then passes repeat for `seconds`. Rates of large products hardly depend on M, so the probe
    also caps M where one product would exceed PRODUCT_FLOPS (GPT-2's LM head at thousands of rows).

    On a CPU each pass runs at torch's thread count and at one thread, alternately, each product keeping
    its best: on a busy machine a parallel product waits for its descheduled thread, and two threads
    read 0.5 GFLOP/s where one ran at 17 (2 cores, 2 busy loops; the training itself then steps at the
    faster count, `--adapt-threads`). The probe is then what the device reaches now, not what a busy
    moment let a parallel product reach, which would make MFU read near 100%.
    """
    device = torch.device(device)
    products = step_products(config or GPTConfig(), rows or PROBE_ROWS)
    target = [min(p.rows, max(MIN_ROWS, int(PRODUCT_FLOPS / p.flops * p.rows))) for p in products]
    generator = torch.Generator().manual_seed(0)  # the probe must not move the training RNG
    threads = torch.get_num_threads()
    counts = sorted({1, threads}) if device.type == "cpu" else [threads]

    def best_over_threads(probed: list[Product], operands: list, best: list[float]) -> list[float]:
        for n in counts:
            torch.set_num_threads(n)
            best = [min(b, _time_product(p, ops, device)) for b, p, ops in zip(best, probed, operands)]
        return best

    scale = 1.0 / 16
    try:
        while True:  # warm-up passes at growing sizes, up to the model's rows while the time allows
            probed = [replace(p, rows=min(m, max(START_ROWS, round(m * scale)))) for p, m in zip(products, target)]
            operands = [_operands(p, device, dtype, generator) for p in probed]
            best = best_over_threads(probed, operands, [math.inf] * len(probed))
            if scale >= 1.0 or 2 * len(counts) * sum(best) > seconds:
                break
            scale *= 2
        deadline = time.perf_counter() + seconds
        for attempt in itertools.count():  # the warm-up's last pass counts too: the best of 3 at least
            best = best_over_threads(probed, operands, best)
            if attempt >= 1 and time.perf_counter() >= deadline:
                break
    finally:
        torch.set_num_threads(threads)
    # the real step's FLOPs, each product's share at the rate its probe reached
    step_flops = sum(p.count * p.flops for p in products)
    step_seconds = sum(p.count * p.flops / (q.flops / max(t, 1e-12)) for p, q, t in zip(products, probed, best))
    return step_flops / step_seconds


def _operands(
    p: Product, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands, laid out as autograd has them for a product of this kind."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if p.kind == "forward":
        return randn(p.rows, p.fan_in), randn(p.fan_out, p.fan_in)  # x, W (F.linear reads W transposed)
    if p.kind == "input grad":
        return randn(p.rows, p.fan_out), randn(p.fan_out, p.fan_in)  # dY, W
    return randn(p.rows, p.fan_out).t(), randn(p.rows, p.fan_in)  # dY^T (a transposed view), x


def _time_product(p: Product, operands: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> float:
    a, b = operands
    _synchronize(device)
    start = time.perf_counter()
    if p.kind == "forward":
        F.linear(a, b)
    else:
        torch.mm(a, b)
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMeter:
    """Tokens per second and MFU over the training time since the last report.

    Only time spent in training steps counts: evaluation and checkpoints pause the clock, so the
    figures describe the step itself whatever the evaluation schedule. MFU never exceeds 100%: a model
    FLOP rate above the probed peak shows that the probe ran while other work slowed it down, so the
    rate reached becomes the peak (a measured lower bound on it), and `warn` is told once.
    """

    def __init__(self, peak_flops: float, warn: Callable[[str], None] | None = None) -> None:
        self.peak_flops = peak_flops
        self.warn = warn if warn is not None else (lambda message: print(message, file=sys.stderr))
        self._warned = False
        self._tokens = 0
        self._flops = 0.0
        self._seconds = 0.0
        self._started: float | None = None

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, tokens: int, flops: float) -> None:
        """End the timing begun by `start`, crediting it with `tokens` processed and their model FLOPs."""
        if self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._started = None
        self._tokens += tokens
        self._flops += flops

    def cancel(self) -> None:
        """Forget the timing begun by `start` (a warm-up step)."""
        self._started = None

    def report(self) -> tuple[float, float]:
        """(tokens/s, MFU) since the previous report; (0, 0) when no time has been measured."""
        if self._seconds <= 0:
            return 0.0, 0.0
        tokens_per_s = self._tokens / self._seconds
        rate = self._flops / self._seconds
        if rate > self.peak_flops:
            if not self._warned:
                self.warn(
                    f"MFU: the model ran at {rate / 1e9:,.1f} GFLOP/s, above the {self.peak_flops / 1e9:,.1f} "
                    f"GFLOP/s the start-up probe measured (other work slowed the probe); MFU is against the "
                    f"fastest rate reached from now on"
                )
                self._warned = True
            self.peak_flops = rate
        mfu = rate / self.peak_flops
        self._tokens, self._flops, self._seconds = 0, 0.0, 0.0
        return tokens_per_s, mfu
