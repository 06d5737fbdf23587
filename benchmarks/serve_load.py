"""Load on `gptlab serve`: 32 concurrent completions, with the server's batching on and off, side by side.

Each configuration starts a real server on a free loopback port (in this process), sends one warm-up
request, then 32 requests at once (varied prompts, 32 sampled tokens each) and records each request's
latency. Two models: a tiny one, where per-call overhead dominates, and a GPT-2 124M-shaped one
(random weights: the speed of a forward pass does not depend on what the weights are). Batching off
is `--max-batch 1`: every request gets its own generation. Runs alternate on/off and each
configuration reports its repeat with the shortest wall time, the least disturbed by other work.
Torch runs one intra-op thread by default here: the client and the server share the process and the
2 cores, and with 2 OpenMP threads competing for them a forward pass was measured 20x slower.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import httpx
import torch

from gptlab.config import GPTConfig, ServerLimits
from gptlab.model import GPT
from gptlab.serve import create_app, running_server
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer

from machine import MACHINE  # benchmarks/machine.py: a script's own folder is on sys.path
RESULTS = Path(__file__).resolve().parent / "results"
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: "
        "You are all resolved rather to die than to famish? All: Resolved. resolved. ") * 4


def models() -> list[tuple[str, GPT, Tokenizer]]:
    torch.manual_seed(0)
    chars = CharTokenizer.from_text(TEXT)
    tiny = GPT(GPTConfig(vocab_size=chars.vocab_size, block_size=128, n_layer=4, n_head=4, n_embd=128))
    gpt2 = GPT(GPTConfig())  # GPT-2 124M's shape
    return [(f"tiny char model ({tiny.num_parameters() / 1e6:.1f}M params)", tiny, chars),
            ("GPT-2 124M shape", gpt2, GPT2Tokenizer())]


async def burst(url: str, prompts: list[str], max_tokens: int) -> tuple[list[float], float, int]:
    """All requests at once; (per-request latencies, wall time, completion tokens)."""
    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[float, int]:
        started = time.perf_counter()
        response = await client.post("/v1/completions", json=dict(model="bench", prompt=prompt,
                                                                  max_tokens=max_tokens, temperature=0.8))
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        await one(client, prompts[0])  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - started
    return [seconds for seconds, _ in results], wall, sum(tokens for _, tokens in results)


def measure(name: str, model: GPT, tokenizer: Tokenizer, max_batch: int, args: argparse.Namespace) -> dict:
    prompts = [TEXT[i * 7:i * 7 + 20 + (i * 13) % 60] for i in range(args.requests)]
    limits = ServerLimits(max_tokens=args.max_tokens, max_choices=1, max_batch=max_batch)
    app = create_app(model, tokenizer, "bench", limits)
    with running_server(app) as url:
        latencies, wall, tokens = asyncio.run(burst(url, prompts, args.max_tokens))
        stats = httpx.get(url + "/health").json()["stats"]
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "model": name, "max_batch": max_batch, "requests": args.requests, "max_tokens": args.max_tokens,
        "p50_ms": round(cuts[49] * 1000, 1), "p95_ms": round(cuts[94] * 1000, 1),
        "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
        "generation_calls": stats["batches"] - 1,  # less the warm-up's
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=ServerLimits().max_batch, help="batching on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, model, tokenizer in models():
        model.eval()
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for max_batch in (args.max_batch, 1):
                result = measure(name, model, tokenizer, max_batch, args)
                print(json.dumps(result))
                if max_batch not in best or result["wall_s"] < best[max_batch]["wall_s"]:
                    best[max_batch] = result
        on, off = best[args.max_batch], best[1]
        on["throughput_vs_unbatched"] = round(on["tokens_per_s"] / off["tokens_per_s"], 2)
        off["throughput_vs_unbatched"] = 1.0
        rows += [on, off]
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": MACHINE, "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "requests": args.requests, "max_tokens": args.max_tokens}
    (RESULTS / "serve_load.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    lines = [
        (f"`gptlab serve` under load: {args.requests} concurrent completions of {args.max_tokens} sampled tokens, "
         f"server and client in one process ({torch.get_num_threads()} torch thread(s)) on {MACHINE}."),
        "",
        "| model | batching | p50 latency | p95 latency | wall time | tokens/s | vs unbatched | generation calls |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        batching = f"on (max {r['max_batch']} rows)" if r["max_batch"] > 1 else "off"
        lines.append(f"| {r['model']} | {batching} | {r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms | "
                     f"{r['wall_s']:.2f} s | {r['tokens_per_s']:.0f} | {r['throughput_vs_unbatched']:.2f}x | "
                     f"{r['generation_calls']} |")
    (RESULTS / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
