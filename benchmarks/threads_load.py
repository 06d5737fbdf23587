"""Inference's thread count chosen by measurement (`gptlab.threads`) against torch's fixed default, quiet
and beside 4 busy Python loops, side by side in one run.

One prompt continued for TOKENS tokens by `gptlab.inference.generate` (the path `gptlab sample`,
`serve` and the Python API share) on the built-in demo's shape (4 layers, 4 heads, 128 wide, context
64, 84 characters; random weights), at torch's default thread count held fixed
(GPTLAB_ADAPT_THREADS=0) and adapting (the default). Each figure is the median of REPEATS runs, the
two settings alternating; the kernels are measured once, untimed, before any run. The issue this
answers: on an AVX2 machine at load 5, sampling 500 characters took 23.7 s at two threads and 9.2 s
at one.

    .venv/bin/python benchmarks/threads_load.py
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

TOKENS = 300
REPEATS = 3
BUSY_LOOPS = 4


def model():
    from gptlab.config import GPTConfig
    from gptlab.model import GPT

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=84, block_size=64, n_layer=4, n_head=4, n_embd=128)).eval()


def run(net, adapt: bool) -> float:
    from gptlab.inference import generate

    os.environ["GPTLAB_ADAPT_THREADS"] = "1" if adapt else "0"
    started = time.perf_counter()
    generate(net, torch.tensor([[1, 2, 3]]), TOKENS, temperature=0)
    return time.perf_counter() - started


def measure(net, label: str) -> dict:
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"fixed": [], "adaptive": []}
    for _ in range(REPEATS):
        for name in times:
            times[name].append(run(net, name == "adaptive"))
    fixed, adaptive = statistics.median(times["fixed"]), statistics.median(times["adaptive"])
    row = {"machine_state": label, "load_1min_before": round(load_before, 2),
           "load_1min_after": round(os.getloadavg()[0], 2), "fixed_threads": torch.get_num_threads(),
           "fixed_s": round(fixed, 2), "adaptive_s": round(adaptive, 2), "speedup": round(fixed / adaptive, 2),
           "runs_s": {k: [round(x, 2) for x in v] for k, v in times.items()}}
    print(row, flush=True)
    return row


def main() -> None:
    net = model()
    for adapt in (False, True):  # the kernels' measurements at every thread count, untimed
        run(net, adapt)
    rows = [measure(net, "quiet (other users' load only)")]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY_LOOPS)]
    try:
        time.sleep(2)
        rows.append(measure(net, f"{BUSY_LOOPS} busy Python loops beside it"))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    meta = {"machine": MACHINE, "python": platform.python_version(), "torch": torch.__version__,
            "tokens": TOKENS, "repeats": REPEATS}
    lines = [f"Inference threads on {MACHINE}: `generate` of {TOKENS} tokens (batch 1, greedy) on the demo's shape "
             f"(0.8 M parameters), torch's {rows[0]['fixed_threads']} threads held fixed against the count chosen by "
             f"measurement (`gptlab.threads`, the default); median of {REPEATS} runs each, alternating. The machine "
             "is shared, so its 1-minute load average is given.", "",
             "| machine | load (1 min) | fixed threads | adaptive | fixed / adaptive |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['machine_state']} | {r['load_1min_before']:.1f} to {r['load_1min_after']:.1f} | "
                     f"{r['fixed_s']:.2f} s | {r['adaptive_s']:.2f} s | {r['speedup']:.2f}x |")
    save_results("threads_load", {**meta, "results": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
