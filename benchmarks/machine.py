"""One line naming the machine a benchmark ran on, read off the machine itself, for every results table;
and where the tables go."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpu() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux), or what the platform module knows elsewhere."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return name, flags


def vector_units(flags: set[str]) -> str:
    """What matters for the matmul rate: the widest vector instructions and whether bf16 ones exist."""
    if "amx_bf16" in flags:
        return "AVX-512, AMX bf16"
    if "avx512_bf16" in flags:
        return "AVX-512 with bf16"
    if "avx512f" in flags:
        return "AVX-512, no bf16 instructions"
    if "avx2" in flags:
        return "AVX2, no AVX-512"
    return "no AVX2"


def describe() -> str:
    name, flags = _cpu()
    cores = os.cpu_count() or 1
    units = f" ({vector_units(flags)})" if flags else ""
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpus = "no GPU"
    build = "CUDA" if torch.version.cuda else "CPU"
    return f"{name}, {cores} cores{units}{held_to()}, {gpus}, torch {torch.__version__.split('+')[0]} {build}"


def held_to() -> str:
    """The instruction-set limits a run was held to (how an AVX2-only CPU is emulated on a bigger one)."""
    limits = [f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
              if os.environ.get(name)]
    return f" held to {' '.join(limits)}" if limits else ""


MACHINE = describe()
RESULTS = Path(__file__).resolve().parent / "results"


def save_results(name: str, results: dict, table: str) -> None:
    """Write benchmarks/results/NAME.json and NAME.md (atomically, through gptlab.fileio) and print the table."""
    from gptlab.fileio import atomic_write_json, atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", results)
    atomic_write_text(RESULTS / f"{name}.md", table)
    print(table)

if __name__ == "__main__":
    print(MACHINE)
