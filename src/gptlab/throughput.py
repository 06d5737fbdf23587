"""How fast training runs: model FLOPs per token, the device's measured matmul peak, and MFU.

Model-FLOPs utilisation (MFU) is the FLOP rate the model's arithmetic needs at the measured token rate,
divided by the rate this device reaches on one large matrix multiply. The numerator counts only the
matrix multiplies the architecture requires, so LayerNorm, softmax, GELU, the optimizer and any
recomputation make MFU lower, never higher.

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

import time

import torch

from .config import GPTConfig


def matmul_parameters(config: GPTConfig) -> int:
    """Entries of the weight matrices that take part in a matrix multiply (the tied head once)."""
    return config.n_layer * 12 * config.n_embd**2 + config.vocab_size * config.n_embd


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (forward and backward) per token for windows of `seq_len` (default: the context)."""
    T = seq_len or config.block_size
    return 6.0 * matmul_parameters(config) + 12.0 * config.n_layer * T * config.n_embd


def matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 0.25
) -> float:
    """FLOP/s of square matrix multiplies in `dtype`, the best of repeated timings over `seconds`.

    The size grows from 256 until one product takes a few milliseconds (1024 in float32 on a laptop
    CPU), so the probe stays short even where a dtype is emulated in software and runs 100x slower.
    """
    device = torch.device(device)
    n = 256
    a, b = _square_pair(n, device, dtype)
    while True:
        once = _time_matmul(a, b, device)  # also the warm-up at this size
        if once > 0.004 or n >= 2048:
            break
        n *= 2
        a, b = _square_pair(n, device, dtype)
    best = once
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = min(best, _time_matmul(a, b, device))
    return 2.0 * n**3 / best


def _square_pair(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)  # the probe must not move the training RNG
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    return a, b


def _time_matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMeter:
    """Tokens per second and MFU over the training time since the last report.

    Only time spent in training steps counts: evaluation and checkpoints pause the clock, so the
    figures describe the step itself whatever the evaluation schedule.
    """

    def __init__(self, peak_flops: float) -> None:
        self.peak_flops = peak_flops
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
        mfu = self._flops / self._seconds / self.peak_flops
        self._tokens, self._flops, self._seconds = 0, 0.0, 0.0
        return tokens_per_s, mfu
