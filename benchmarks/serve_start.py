"""How soon `gptlab serve` answers: seconds from launching the command to the first 200 from /health, with
a cold kernel cache (a fresh GPTLAB_KERNEL_CACHE file: the first start on a machine) and then a warm
one (the same file: every later start), and until /health says `warm` (every batch size measured, in
the background while the server already answers).

Two models, random weights (start-up does not depend on them), saved like a run: the built-in demo's
shape (`shakespeare-char-default`: 4 layers, 4 heads, 128 wide, context 64, 84 characters, 0.8 M
parameters) and GPT-2 124M's shape with GPT-2's tokenizer. Targets (issue 27): the demo within 10 s and
GPT-2 124M within 30 s on 2 cores, cold.

    .venv/bin/python benchmarks/serve_start.py
"""

from __future__ import annotations

import os
import platform
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

TARGETS = {"demo (0.8 M)": 10.0, "GPT-2 124M shape": 30.0}


def save_models(root: Path) -> dict[str, Path]:
    from gptlab.checkpoint import save_model
    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer

    torch.manual_seed(0)
    chars = ["\n", " "] + list(string.ascii_letters + string.digits + string.punctuation)[:82]  # 84, as the demo
    demo = root / "demo"
    save_model(GPT(GPTConfig(vocab_size=len(chars), block_size=64, n_layer=4, n_head=4, n_embd=128)), demo)
    CharTokenizer(chars).save(demo)
    gpt2 = root / "gpt2"
    save_model(GPT(GPTConfig()), gpt2)
    GPT2Tokenizer().save(gpt2)
    return {"demo (0.8 M)": demo, "GPT-2 124M shape": gpt2}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(model: Path, kernel_cache: Path) -> dict:
    """Launch `gptlab serve`; seconds to the first /health answer and to `warm`; then stop it."""
    port = free_port()
    env = {**os.environ, "GPTLAB_KERNEL_CACHE": str(kernel_cache)}
    launched = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(model), "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    health = warm = None
    try:
        while warm is None:
            if process.poll() is not None:
                raise RuntimeError(f"gptlab serve exited: {process.communicate()[1][-2000:]}")
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            now = time.perf_counter() - launched
            health = health or now
            if body.get("warm"):
                warm = now
            else:
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"to_health_s": round(health, 2), "to_warm_s": round(warm, 2)}


def main() -> None:
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = save_models(Path(tmp))
        for name, path in models.items():
            cache = Path(tmp) / f"kernels-{path.name}.json"  # fresh: nothing measured on this machine yet
            cold = start(path, cache)
            again = start(path, cache)
            rows.append({"model": name, "target_s": TARGETS[name], "cold": cold, "warm_cache": again})
            print(rows[-1], flush=True)
    load = (f"load average {', '.join(f'{x:.2f}' for x in load_before)} before, "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} after")
    meta = {"machine": MACHINE, "load": load, "python": platform.python_version(), "torch": torch.__version__}
    lines = [f"`gptlab serve` start-up on {MACHINE}; {load}. Seconds from launching the command to the first "
             "answer of /health, and until /health says `warm` (every batch size's kernels measured, done in "
             "the background while the server answers). Cold: a fresh kernel cache (the first start on a "
             "machine); warm cache: the next start. Random weights.", "",
             "| model | target | cold: /health | cold: warm | warm cache: /health | warm cache: warm |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['target_s']:.0f} s | {r['cold']['to_health_s']:.1f} s | "
                     f"{r['cold']['to_warm_s']:.1f} s | {r['warm_cache']['to_health_s']:.1f} s | "
                     f"{r['warm_cache']['to_warm_s']:.1f} s |")
    save_results("serve_start", {**meta, "results": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
