"""Training-step speed: gptlab (eager and torch.compile) against transformers' GPT2LMHeadModel.

A training step is what `gptlab train` does per step: forward with the loss, backward, gradient
clipping at 1.0, AdamW, zeroing the gradients. Every contender gets the same batch, the same shapes and
the same optimizer (gptlab's `configure_optimizer`: AdamW, decay on matrices, the same implementation
flags), in the same process. Two configurations, on the 65-character vocabulary of Tiny Shakespeare:

    (a) 4 layers, 4 heads, 128 wide, context 64, batch 12   (nanoGPT's documented CPU recipe)
    (b) 6 layers, 6 heads, 384 wide, context 256, batch 8

Rounds alternate the contenders, and each reports its fastest round: other work on the machine can
only add time, so the minimum is the least disturbed figure. MFU divides the model's FLOP rate
(gptlab.throughput.flops_per_token) by the fastest of the probes of the model's own matrix products
(gptlab.throughput.matmul_peak: the linear layers' forward and backward shapes at the batch) taken
between the rounds, in the same dtype.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/train.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from typing import Callable

import torch

from gptlab.config import GPTConfig
from gptlab.train.config import TrainConfig
from gptlab.model import GPT
from gptlab.train.optim import configure_optimizer
from gptlab.throughput import flops_per_token, matmul_peak
from gptlab.device import DTYPES
from gptlab.train.device import autocast_context

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path
VOCAB = 65
CONFIGS = {
    "a": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "b": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
DEVICE = torch.device("cpu")


def model_config(shape: dict) -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, block_size=shape["block_size"], n_layer=shape["n_layer"],
                     n_head=shape["n_head"], n_embd=shape["n_embd"])


def gptlab_model(shape: dict) -> GPT:
    return GPT(model_config(shape))


def transformers_model(shape: dict) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=shape["block_size"], n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def training_step(model: torch.nn.Module, loss_of: Callable, dtype: str, train_config: TrainConfig) -> Callable:
    """A closure doing one full training step, exactly as gptlab's loop does it."""
    optimizer = configure_optimizer(model, train_config, DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast_context(DEVICE, dtype):
            loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def contenders(shape: dict, dtype: str, with_compile: bool) -> dict[str, tuple[Callable, float]]:
    """name -> (step, seconds its first steps took: compilation for the compiled model)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (shape["batch_size"], shape["block_size"] + 1), generator=g)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    train_config = TrainConfig(**{k: v for k, v in shape.items()}, dtype=dtype, lr=1e-3)
    ours = gptlab_model(shape)
    theirs = transformers_model(shape)
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()), "not the same network"
    steps = {
        "gptlab": training_step(ours, lambda: ours(inputs, targets).loss, dtype, train_config),
        # labels = the inputs: GPT2LMHeadModel shifts them itself; no KV cache while training
        "transformers": training_step(theirs, lambda: theirs(input_ids=inputs, labels=inputs, use_cache=False).loss,
                                      dtype, train_config),
    }
    if with_compile:
        compiled_model = gptlab_model(shape)
        compiled = torch.compile(compiled_model)
        steps["gptlab --compile"] = training_step(compiled_model, lambda: compiled(inputs, targets).loss, dtype,
                                                  train_config)
    warmed = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(2):
            step()
        warmed[name] = (step, time.perf_counter() - start)
    return warmed


def measure(label: str, shape: dict, dtype: str, rounds: int, steps_per_round: int, with_compile: bool) -> dict:
    runners = contenders(shape, dtype, with_compile)
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks = []
    for r in range(rounds):
        peaks.append(matmul_peak(DEVICE, DTYPES[dtype], seconds=0.5, config=model_config(shape),
                                 rows=shape["batch_size"] * shape["block_size"]))
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            step = runners[name][0]
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            times[name].append((time.perf_counter() - start) / steps_per_round)
        print(f"  ({label}, {dtype}) round {r + 1}/{rounds}: "
              + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), flush=True)
    peak = max(peaks)
    tokens = shape["batch_size"] * shape["block_size"]
    flops = flops_per_token(model_config(shape))
    reference = min(times["transformers"])
    rows = []
    for name in names:
        best = min(times[name])
        rows.append(dict(
            config=label, dtype=dtype, implementation=name, ms_per_step=best * 1e3, tokens_per_s=tokens / best,
            vs_transformers=reference / best, mfu=tokens / best * flops / peak,
            warmup_s=runners[name][1], rounds_ms=[t * 1e3 for t in times[name]],
        ))
    return dict(config=label, dtype=dtype, peak_gflops=peak / 1e9, peaks_gflops=[p / 1e9 for p in peaks],
                flops_per_token=flops, rows=rows)


def markdown(results: dict) -> str:
    lines = [
        f"Training step (forward, backward, clip, AdamW), {results['machine']}, {results['threads']} threads, "
        f"load average {results['load_before']} before / {results['load_after']} after.",
        "",
        "| config | dtype | implementation | ms/step | tokens/s | vs transformers | vs gptlab float32 | MFU "
        "| first 2 steps (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fp32 = {(row["config"], row["implementation"]): row["tokens_per_s"] for block in results["measurements"]
            for row in block["rows"] if row["dtype"] == "float32"}
    for block in results["measurements"]:
        for row in block["rows"]:
            reference = fp32.get((row["config"], "gptlab"))
            own = f"{row['tokens_per_s'] / reference:.2f}x" if reference else "-"
            lines.append(
                f"| ({row['config']}) | {row['dtype']} | {row['implementation']} | {row['ms_per_step']:,.1f} | "
                f"{row['tokens_per_s']:,.0f} | {row['vs_transformers']:.2f}x | {own} | {row['mfu']:.0%} "
                f"| {row['warmup_s']:.1f} |"
            )
    lines += ["", "MFU is against the peak of the row's own dtype on the model's own matrix products (fastest probe): " + "; ".join(
        f"({b['config']}) {b['dtype']} {b['peak_gflops']:.1f} GFLOP/s" for b in results["measurements"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="a,b", help="which configurations, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="which dtypes, comma-separated")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--out", default="train", help="results/<out>.json and .md")
    args = parser.parse_args()
    # an empty compiler cache, so that "first 2 steps" of a compiled row is a fresh machine's compile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptlab-inductor-")
    plan = {"a": (9, 20), "b": (7, 3)}  # rounds, steps per round
    results = dict(machine=MACHINE, torch=torch.__version__, threads=torch.get_num_threads(),
                   python=platform.python_version(), load_before=round(os.getloadavg()[0], 2), measurements=[])
    for dtype in args.dtypes.split(","):
        for label in args.configs.split(","):
            rounds, steps = plan[label]
            results["measurements"].append(
                measure(label, CONFIGS[label], dtype, rounds, steps, with_compile=not args.no_compile))
    results["load_after"] = round(os.getloadavg()[0], 2)
    save_results(args.out, results, markdown(results))


if __name__ == "__main__":
    main()
