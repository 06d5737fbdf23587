"""Whether this device multiplies bf16 matrices natively, and how much faster than float32: asked first,
then measured, never assumed.

A CPU without bf16 instructions (AVX2-only x86, for one) still runs bf16 products, in software, 10 to
50 times slower than float32: a fast path taken there by assumption (bf16 autocast, Muon's bf16
Newton-Schulz iterations) makes the run many times slower with no error. So the capability is asked
first (`bf16_native`: CUDA's own answer; on a CPU, oneDNN's, the library that runs torch's bf16 CPU
products), and where it says no, bf16 is not timed at all. Where it says yes, the two dtypes are timed
in interleaved rounds and each keeps its best: other work on a busy machine only adds time, so the
best of several rounds is the closest reading of what the device can do, and interleaving spreads a
busy moment over both dtypes rather than onto one.

Used by training (`--dtype auto`, Muon's iterations) and by whatever loads a model in bf16
(`warn_if_emulated`), so the answer is measured once per process and device.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence

import torch

ROUNDS = 3  # interleaved rounds of the bf16 and float32 timings; each dtype keeps its best
# The products timed when no caller names its own: a small model's weight products and Muon's
# Newton-Schulz products (m x k @ k x n), where an emulated bf16 is slowest relative to float32.
SHAPES = ((512, 128, 512), (128, 512, 128), (128, 128, 512))
_warned: set[str] = set()


def bf16_native(device: torch.device | str) -> bool:
    """Whether this device has bf16 arithmetic in hardware: CUDA's answer on a GPU; on a CPU, whether
    oneDNN can run bf16 here (AVX-512-bf16, AMX, or AVX-NE-CONVERT; it honours ONEDNN_MAX_CPU_ISA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: no fast bf16 either
        return False


def interleaved_speedup(rate: Callable[[torch.dtype], float], rounds: int = ROUNDS) -> float:
    """bf16's rate over float32's, `rate(dtype)` (any unit, higher is faster) called alternately
    `rounds` times each, each dtype's best reading kept."""
    best = {torch.bfloat16: 0.0, torch.float32: 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], rate(dtype))
    return best[torch.bfloat16] / max(best[torch.float32], 1e-30)


def product_rate(
    device: torch.device | str, dtype: torch.dtype, shapes: Sequence[tuple[int, int, int]] = SHAPES,
    repeats: int = 3,
) -> float:
    """FLOP/s of the products `shapes` (m, k, n) in `dtype`: their FLOPs over the sum of each one's
    fastest of `repeats` runs (after one untimed run)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)  # leave the caller's random state alone
    total_flops = total_seconds = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=generator).to(device=device, dtype=dtype)
        best = float("inf")
        for i in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _synchronize(device)
            if i:
                best = min(best, time.perf_counter() - start)
        total_flops += 2.0 * m * k * n
        total_seconds += best
    return total_flops / max(total_seconds, 1e-12)


@functools.cache
def bf16_speedup(device: str) -> float:
    """bf16's product rate over float32's on `device` (a name, so that the answer is cached), measured
    in interleaved rounds on SHAPES: above 1 where bf16 is the faster, far below 1 where it is emulated."""
    return interleaved_speedup(lambda dtype: product_rate(device, dtype))


def fast_bf16(device: torch.device | str, speedup: Callable[[], float], threshold: float = 1.0) -> bool:
    """Whether bf16 pays on `device`: native (asked first, nothing timed where it is not) and measured
    (`speedup()`, bf16's rate over float32's) at least `threshold` times as fast."""
    return bf16_native(device) and speedup() >= threshold


def warn_if_emulated(
    dtype: str | torch.dtype, device: torch.device | str, say: Callable[[str], None] | None = None,
    option: str = "--dtype", way_out: str | None = None,
) -> float | None:
    """Say once per process and device where bf16 was asked for and this device runs it slower than
    float32 (emulated in software), with the measured factor and the way out (`way_out`; by default
    `{option} auto`, training's); returns the measured speedup (None where nothing was measured: another
    dtype, or a device that was already told)."""
    if dtype not in ("bfloat16", torch.bfloat16):
        return None
    device = torch.device(device)
    if device.type not in ("cpu", "cuda") or str(device) in _warned:
        return None
    speedup = bf16_speedup(str(device))
    if speedup < 1.0:
        _warned.add(str(device))
        native = "" if bf16_native(device) else " (it has no native bf16: the products are emulated in software)"
        message = (f"warning: {option} bfloat16: this {device.type.upper() if device.type == 'cpu' else 'GPU'} "
                   f"multiplies bf16 matrices {1 / max(speedup, 1e-12):,.1f}x slower than float32{native}; "
                   f"{way_out or f'{option} auto chooses the faster, here float32'}")
        (say or (lambda line: print(line, file=sys.stderr)))(message)
    return speedup


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
