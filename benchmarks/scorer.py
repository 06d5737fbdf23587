"""The one scorer against the forward pass alone, on the same windows (issue 15: at least 80%).

Two models: issue 15's 7M-parameter GPT-2-BPE run (4 layers, 128 wide, vocabulary 50,257, windows of
64 tokens, 10 per batch) and a character-level model (6 layers, 256 wide, vocabulary 65, context 256,
8 windows per batch). Per model, on one fixed batch of random tokens, interleaved rounds time:

- forward: `model(x).logits`, every position through the LM head, no loss (the ceiling);
- before: what `gptlab eval` did before issue 15, the forward pass then
  `cross_entropy(logits.transpose(1, 2), y)`;
- scorer: `evaluate.token_nll` scoring every position (a disjoint reading, stride = context);
- scorer, stride context/2: `token_nll` scoring the second half of each window, as `gptlab eval`
  does by default (the same windows, half the positions through the head);
- the scorer at other logit block sizes (`LOGIT_BLOCK`), to show the chosen one.

Throughput is windows' tokens per second; the ratio is against the forward pass in the same run. The
median of the rounds is reported. Runs in about 1 minute on 2 quiet cores (4 at load 5).

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/scorer.py
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.config import GPTConfig
from gptlab.evaluate import scorer
from gptlab.model import GPT

from machine import MACHINE  # benchmarks/machine.py: a script's own folder is on sys.path

RESULTS = Path(__file__).parent / "results"
ROUNDS = 5
MODELS = {
    "gpt2-bpe 7M (4x128, V=50257, 10x64 windows)": (GPTConfig(vocab_size=50257, block_size=64, n_layer=4, n_head=4,
                                                              n_embd=128), 10),
    "char (6x256, V=65, 8x256 windows)": (GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=8,
                                                    n_embd=256), 8),
}
BLOCKS = (2**20, 2**22, 2**24, 2**26)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_block(block: int, fn):
    def run():
        saved, scorer.LOGIT_BLOCK = scorer.LOGIT_BLOCK, block
        try:
            fn()
        finally:
            scorer.LOGIT_BLOCK = saved
    return run


def measure(config: GPTConfig, batch: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (batch, config.block_size))
    y = torch.randint(0, config.vocab_size, (batch, config.block_size))
    half = torch.zeros_like(x, dtype=torch.bool)
    half[:, config.block_size // 2:] = True
    cases = {
        "forward": lambda: model(x).logits,
        "before (forward + 3-D cross-entropy)": lambda: F.cross_entropy(
            model(x).logits.float().transpose(1, 2), y, reduction="none"),
        "scorer": lambda: scorer.token_nll(model, x, y),
        "scorer, stride context/2": lambda: scorer.token_nll(model, x, y, half),
    }
    for block in BLOCKS:
        if block != scorer.LOGIT_BLOCK:
            cases[f"scorer, LOGIT_BLOCK 2^{block.bit_length() - 1}"] = with_block(block, lambda: scorer.token_nll(model, x, y))
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(ROUNDS):
            for name, fn in cases.items():
                times[name].append(timed(fn))
    tokens = x.numel()
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        name: {"ms": 1000 * median[name], "tokens_per_s": tokens / median[name],
               "vs_forward": median["forward"] / median[name]}
        for name in cases
    }


def markdown(results: dict) -> str:
    lines = [f"One scorer against the forward pass ({results['machine']}; {results['threads']} threads; load "
             f"{results['load_before']} before, {results['load_after']} after; median of {ROUNDS} rounds).",
             f"The chosen logit block: 2^{results['logit_block'].bit_length() - 1} entries.", ""]
    for model, cases in results["models"].items():
        lines += [f"**{model}**", "", "| | ms per batch | tokens/s | throughput vs forward |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {c['ms']:.1f} | {c['tokens_per_s']:,.0f} | {c['vs_forward']:.0%} |"
                  for name, c in cases.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    load_before = round(os.getloadavg()[0], 2)
    results = {"machine": MACHINE, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "logit_block": scorer.LOGIT_BLOCK, "load_before": load_before,
               "models": {name: measure(config, batch) for name, (config, batch) in MODELS.items()}}
    results["load_after"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scorer.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (RESULTS / "scorer.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
