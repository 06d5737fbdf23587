"""Where a training step's time goes: configuration (b) of benchmarks/train.py, float32 and bf16, eager
and compiled, by torch.profiler; then the candidates for the parts that are not matrix products.

Part 1, the profile: each mode takes two warm-up steps (compiling, for the compiled ones) and then
profiles `--steps` steps of gptlab's own training step (forward with the loss, backward, clipping,
AdamW), with the kernel choices gptlab makes on this machine. Time is each operator's self time,
grouped: the linear layers' products (forward and both gradients), attention (the fused kernel or
the textbook formula's products and softmax, forward and backward), GELU, LayerNorm, the loss
(log-softmax and NLL), AdamW and clipping, the dtype casts autocast inserts, and the rest. A compiled
graph's fused loops are grouped by the first of those operations their name holds.

Part 2, the candidates, each the best of a few timed steps with one thing changed: AdamW fused,
foreach and for-loop; attention fused or textbook; compiled or eager; and the bf16 / float32 ratio of
the model's own matrix products (gptlab.throughput.matmul_peak), which says how much bf16 can give.

Bounded: about 4 minutes on 2 CPU cores.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/train_profile.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections import defaultdict
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from gptlab import kernels
from gptlab.model import GPT
from gptlab.train.optim import parameter_groups
from gptlab.throughput import matmul_parameters, matmul_peak
from gptlab.device import DTYPES
from gptlab.train.device import autocast_context

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path
from train import CONFIGS, VOCAB, model_config

DEVICE = torch.device("cpu")
SHAPE = CONFIGS["b"]
PARTS = ["linear products", "attention", "GELU", "LayerNorm", "loss", "AdamW", "clipping", "copies and casts", "other"]


def make_step(dtype: str, compiled: bool, adamw: str = "fused") -> Callable[[], None]:
    """One training step as gptlab's loop runs it, with the phases marked for the profiler."""
    torch.manual_seed(0)
    model = GPT(model_config(SHAPE))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (SHAPE["batch_size"], SHAPE["block_size"] + 1), generator=g)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[adamw]
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99), **flags)
    forward = torch.compile(model) if compiled else model
    params = list(model.parameters())

    def step() -> None:
        with record_function("forward"), autocast_context(DEVICE, dtype):
            loss = forward(inputs, targets).loss
        with record_function("backward"):
            loss.backward()
        with record_function("clipping"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with record_function("AdamW"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def best_step(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def part_of(name: str) -> str:
    """The part of the step an operator (or a compiled graph's fused loop) belongs to."""
    n = name.lower()
    if "nll_loss" in n or "log_softmax" in n or "cross_entropy" in n:
        return "loss"
    if any(s in n for s in ("scaled_dot_product", "flash_attention", "baddbmm", "bmm", "softmax")):
        return "attention"
    if n in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul") or "extern_kernels.mm" in n \
            or "extern_kernels.addmm" in n or "mkl_linear" in n:
        return "linear products"
    if "layer_norm" in n:
        return "LayerNorm"
    if "gelu" in n or "tanh" in n or "sigmoid" in n:
        return "GELU"
    if n in ("aten::_to_copy", "aten::copy_", "aten::to", "aten::contiguous", "aten::clone"):
        return "copies and casts"
    return "other"


def profile_mode(dtype: str, compiled: bool, steps: int) -> dict:
    step = make_step(dtype, compiled)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    seconds: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name in ("forward", "backward", "clipping", "AdamW"):
            continue
        root = event
        while root.cpu_parent is not None:
            root = root.cpu_parent
        part = root.name if root.name in ("clipping", "AdamW") else part_of(event.name)
        seconds[part] += event.self_cpu_time_total / 1e6
        by_name[f"{part}: {event.name}"] += event.self_cpu_time_total / 1e3 / steps
    total = sum(seconds.values())
    wall = best_step(step, 0, steps)
    return dict(dtype=dtype, compiled=compiled, ms_per_step_profiled=total / steps * 1e3, ms_per_step=wall * 1e3,
                parts_ms={part: seconds.get(part, 0.0) / steps * 1e3 for part in PARTS},
                top_operators_ms=dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:40]))


def candidates(steps: int) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for adamw in ("fused", "foreach", "for-loop"):
            rows.append(dict(dtype=dtype, change=f"AdamW {adamw}", ms=best_step(make_step(dtype, False, adamw), 2, steps) * 1e3))
        for path in kernels.ATTENTION_PATHS:
            with kernels.force(attention=path):
                rows.append(dict(dtype=dtype, change=f"attention {path}", ms=best_step(make_step(dtype, False), 2, steps) * 1e3))
        for path in kernels.ATTENTION_PATHS:
            torch._dynamo.reset()
            with kernels.force(attention=path):
                rows.append(dict(dtype=dtype, change=f"compiled, attention {path}",
                                 ms=best_step(make_step(dtype, True), 2, steps) * 1e3))
        for form in kernels.GELU_FORMS:
            torch._dynamo.reset()
            with kernels.force(gelu=form):
                rows.append(dict(dtype=dtype, change=f"compiled, GELU {form} form",
                                 ms=best_step(make_step(dtype, True), 2, steps) * 1e3))
    return rows


def markdown(r: dict) -> str:
    modes = r["profile"]
    header = " | ".join(f"{m['dtype']} {'compiled' if m['compiled'] else 'eager'}" for m in modes)
    lines = [
        f"Training step of configuration (b) (6 layers, 6 heads, 384 wide, context 256, batch 8, vocabulary "
        f"{VOCAB}), {r['machine']}, {r['threads']} threads, load average {r['load_before']} before / "
        f"{r['load_after']} after. Milliseconds per step by part (operators' self time under torch.profiler, "
        f"{r['steps']} steps), then the step unprofiled (fastest of {r['steps']}).",
        "",
        f"| part | {header} |",
        "| --- |" + " ---: |" * len(modes),
    ]
    for part in PARTS:
        lines.append(f"| {part} | " + " | ".join(
            f"{m['parts_ms'][part]:.0f} ({m['parts_ms'][part] / m['ms_per_step_profiled']:.0%})" for m in modes) + " |")
    lines.append("| **step, profiled** | " + " | ".join(f"**{m['ms_per_step_profiled']:.0f}**" for m in modes) + " |")
    lines.append("| step, unprofiled | " + " | ".join(f"{m['ms_per_step']:.0f}" for m in modes) + " |")
    fp32 = modes[0]["ms_per_step"]
    lines.append("| vs float32 eager | " + " | ".join(f"{fp32 / m['ms_per_step']:.2f}x" for m in modes) + " |")
    lines += [
        "",
        f"The model's own matrix products (forward and backward shapes, gptlab.throughput.matmul_peak): float32 "
        f"{r['peak_gflops']['float32']:.0f} GFLOP/s, bf16 {r['peak_gflops']['bfloat16']:.0f} GFLOP/s: bf16 "
        f"**{r['bf16_over_float32']:.2f}x** float32. At 100% of those rates the step's products alone would take "
        f"{r['matmul_floor_ms']['float32']:.0f} ms in float32 and {r['matmul_floor_ms']['bfloat16']:.0f} ms in bf16.",
        "",
        "Candidates, one change at a time (ms per step, fastest of the timed steps; eager unless compiled):",
        "",
        "| dtype | change | ms/step |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {c['dtype']} | {c['change']} | {c['ms']:.0f} |" for c in r["candidates"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="profiled and timed steps per mode")
    parser.add_argument("--no-candidates", action="store_true", help="the profile only")
    parser.add_argument("--out", default="train_profile", help="results/<out>.json and .md")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptlab-inductor-")
    torch._inductor.config.cpp.enable_kernel_profile = True  # compiled loops appear by name in the profile
    rows = SHAPE["batch_size"] * SHAPE["block_size"]
    results = dict(machine=MACHINE, torch=torch.__version__, threads=torch.get_num_threads(),
                   python=platform.python_version(), load_before=round(os.getloadavg()[0], 2), steps=args.steps)
    peaks = {dtype: matmul_peak(DEVICE, DTYPES[dtype], seconds=1.0, config=model_config(SHAPE), rows=rows)
             for dtype in ("float32", "bfloat16")}
    matmul_flops = 6 * matmul_parameters(model_config(SHAPE)) * rows  # the linear layers' products, forward and backward
    results.update(peak_gflops={k: v / 1e9 for k, v in peaks.items()}, bf16_over_float32=peaks["bfloat16"] / peaks["float32"],
                   matmul_floor_ms={k: matmul_flops / v * 1e3 for k, v in peaks.items()})
    results["profile"] = [profile_mode(dtype, compiled, args.steps)
                          for dtype in ("float32", "bfloat16") for compiled in (False, True)]
    results["candidates"] = [] if args.no_candidates else candidates(args.steps)
    results["load_after"] = round(os.getloadavg()[0], 2)
    save_results(args.out, results, markdown(results))


if __name__ == "__main__":
    main()
