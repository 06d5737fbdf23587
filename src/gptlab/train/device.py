"""In what precision a run computes, and whether it can: autocast, TF32, the dtype `auto` chooses,
whether torch.compile can work here, and whether the run fits in memory (the device itself is named in
`gptlab.device`, where inference reaches it too)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable

import torch

from ..config import GPTConfig
from ..device import DTYPES
from ..errors import GptlabError
from ..precision import fast_bf16, interleaved_speedup
from ..throughput import matmul_parameters, matmul_peak
from . import distributed
from .distributed import Group

AUTO_BF16_SPEEDUP = 1.5  # `--dtype auto` takes bf16 where its products run this much faster than float32


def enable_tf32(device: torch.device) -> None:
    """On CUDA, float32 products run on the tensor cores in TF32 (10-bit mantissa inputs, float32
    accumulation), as nanoGPT and llm.c train: several times faster on Ampere and later, and what
    mixed precision leaves in float32 (the optimizer, the loss) is not a product."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for the forward pass; float32 runs without it.

    The weights, the gradients and the optimizer stay in float32 whatever the dtype (mixed precision).
    float16 also needs a gradient scaler against underflow, which gptlab runs on CUDA only.
    """
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise GptlabError(
            "--dtype float16 needs a CUDA device (its gradient scaler is CUDA-only); on a CPU use bfloat16"
        )
    if device.type not in ("cpu", "cuda"):
        raise GptlabError(f"--dtype {dtype} runs on cpu and cuda devices, not {device.type}; use --dtype float32")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GptlabError("--dtype bfloat16: this GPU does not support bfloat16; use --dtype float16")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def resolve_dtype(
    name: str, device: torch.device, group: Group = Group(), model: GPTConfig | None = None, rows: int | None = None,
    speedup: Callable[[], float] | None = None,
) -> str:
    """`auto` -> bfloat16 where this device has bf16 in hardware and multiplies the model's bf16
    matrices at least 1.5x as fast as float32; else float32.

    The capability is asked first (`precision.bf16_native`), so an emulated bf16 is never timed, let
    alone chosen: on a busy machine a float32 probe can read 0.2 GFLOP/s and lose to an emulated bf16
    50x slower. Where bf16 is native, the model's products (`model` at `rows` tokens a micro-batch, the
    probe MFU uses) are timed in interleaved rounds, each dtype's best kept (`speedup` replaces that
    measurement in tests). A GPU answers for itself. Rank 0 decides for every process.
    """
    if name != "auto":
        return name
    chosen = None
    if group.is_main:  # the other processes wait rather than probe alongside and slow the probe down
        if device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        else:
            measure = speedup or (lambda: interleaved_speedup(
                lambda dtype: matmul_peak(device, dtype, seconds=0.05, config=model, rows=rows)))
            fast = fast_bf16(device, measure, threshold=AUTO_BF16_SPEEDUP)
        chosen = "bfloat16" if fast else "float32"
    return distributed.broadcast_from_main(chosen, group)


def compile_unavailable(device: torch.device) -> str:
    """Why torch.compile cannot work here, or "" when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({sys.version.split()[0]}) with torch {torch.__version__}"
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "torch.compile needs a C++ compiler on a CPU and none (g++, c++, clang++ or $CXX) is on PATH"
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile needs Triton on CUDA and it is not installed"
    else:
        return f"gptlab compiles on cpu and cuda devices, not {device.type}"
    return ""


def check_memory(model: GPTConfig, tokens: int, dtype: str, device: torch.device, *,
                 bytes_per_parameter: int = 12) -> None:
    """Refuse, before allocating anything, a run that cannot fit in this device's memory at all.

    The estimate is a lower bound: the weights, their gradients and one optimizer moment (12 bytes a
    parameter), the logits of one micro-batch of `tokens` tokens and their gradient, and each
    block's input (what even activation checkpointing keeps). Frozen weights (LoRA) take 4 bytes a
    parameter, `bytes_per_parameter`. A run it lets through can still run out
    of memory (`out_of_memory` then tells it apart).
    """
    parameters = matmul_parameters(model) + model.block_size * model.n_embd
    activation_bytes = 4 if dtype in ("float32", "auto") else 2
    need = bytes_per_parameter * parameters + tokens * activation_bytes * (2 * model.vocab_size + model.n_layer * model.n_embd)
    if device.type == "cuda":
        have, what = torch.cuda.get_device_properties(device).total_memory, f"{device}'s memory"
    else:
        have, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        raise GptlabError(
            f"this run needs at least {need / 2**30:,.1f} GiB ({parameters:,} parameters"
            f"{' with their gradients and optimizer state' if bytes_per_parameter > 4 else ''}, and micro-batches of {tokens:,} tokens), more than {what} ({have / 2**30:,.1f} GiB); "
            f"choose a smaller model, --batch-size or --block-size"
        )


def out_of_memory(exc: BaseException) -> bool:
    """Whether torch failed to allocate memory (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )
