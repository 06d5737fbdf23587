"""Load on `gptlab serve`: concurrent clients against the continuous-batching engine, against the previous
scheduler, and against one offline batched `generate` call at the same batch size, side by side in one run.

For each concurrency C (16 and 32): C clients send their requests at once, each with its own seed and
temperature, half of them streaming, every prompt 32 tokens (token ids, so that every contender reads
the same lengths), 32 sampled tokens each. Aggregate tokens/s is the completion tokens over the wall
time from the first request to the last answer (after an untimed warm-up burst of 4 tokens each); time
to first token is measured by the streaming clients (the first `data:` chunk that carries text). A late arrival then probes the promise that a
new request waits at most one decode step plus its own prefill: one more streaming request sent while
the C - 1 others are mid-way, its time to first token against the engine's step time (/metrics).

The contenders, on one GPT-2 124M-shaped model with random weights (speed does not depend on the
weights): the engine (this checkout, in this process); the previous server, commit 69885c2 (a checkout
at --old-src, in a subprocess on its own PYTHONPATH); and `generate` on a (C, 32) batch, the offline
ceiling. Torch runs one intra-op thread everywhere: client and server share a process and the
machine's 2 cores, and 2 OpenMP threads competing with the event loop were measured 20x slower.

Bounded: about 5 minutes on a quiet 2-core machine, most of it the previous server (which answers 16
clients in about 35 s and 32 in about 70 s there). Prepare the old checkout once:

    git worktree add --detach /tmp/old-serve 69885c2
    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from machine import MACHINE  # benchmarks/machine.py: a script's own folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS = 32
OLD_COMMIT = "69885c2"


def build_model():
    """GPT-2 124M's shape with random weights, and GPT-2's tokenizer, from whichever gptlab is on the path."""
    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from gptlab.tokenizers import GPT2Tokenizer

    torch.manual_seed(0)
    return GPT(GPTConfig()).eval(), GPT2Tokenizer()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n, PROMPT_TOKENS), generator=g).tolist()


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def client(http: httpx.AsyncClient, i: int, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    """One request; returns its latency, time to first token (streams only) and completion tokens."""
    body = dict(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.5 + 0.03 * i, seed=1000 + i)
    started = time.perf_counter()
    if not stream:
        response = await http.post("/v1/completions", json=body)
        response.raise_for_status()
        return dict(latency=time.perf_counter() - started, ttft=None,
                    tokens=response.json()["usage"]["completion_tokens"])
    first, tokens = None, 0
    body.update(stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return dict(latency=time.perf_counter() - started, ttft=first, tokens=tokens)


async def burst(url: str, clients: int, max_tokens: int, late: bool) -> dict:
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0), limits=limits) as http:
        # warm-up, untimed: the same burst with 4 tokens each, so that first calls (and the kernels' one-time
        # measurement of each new shape on this machine) fall outside the timed run
        await asyncio.gather(*(client(http, i, p, 4, stream=bool(i % 2)) for i, p in enumerate(prompts(clients, 99))))
        batch = prompts(clients)
        started = time.perf_counter()
        if not late:
            results = await asyncio.gather(*(client(http, i, p, max_tokens, stream=bool(i % 2))
                                             for i, p in enumerate(batch)))
            wall = time.perf_counter() - started
            return dict(results=results, wall=wall)
        # the late arrival: C - 1 clients first, one more once they are half-way through their tokens
        running = [asyncio.ensure_future(client(http, i, p, max_tokens, stream=bool(i % 2)))
                   for i, p in enumerate(batch[:-1])]
        while (await http.get("/health")).json()["stats"]["completion_tokens"] < (clients - 1) * max_tokens // 2 + 2:
            await asyncio.sleep(0.05)
        probe = await client(http, clients - 1, batch[-1], 4, stream=True)
        await asyncio.gather(*running)
        metrics = (await http.get("/metrics")).text
    steps = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("gptlab_engine_step_seconds_")}
    return dict(probe_ttft=probe["ttft"],
                mean_step=steps["gptlab_engine_step_seconds_sum"] / steps["gptlab_engine_step_seconds_count"])


def measure_server(create_app, running_server, limits, model, tokenizer, clients: int, max_tokens: int,
                   late: bool = False) -> dict:
    app = create_app(model, tokenizer, "bench", limits)
    with running_server(app) as url:
        # the server answers once batch size 1 is measured; the load is measured once every size is
        # (/health's `warm`; the previous server measured them all before it listened, and has no such field)
        while not httpx.get(url + "/health", timeout=60).json().get("warm", True):
            time.sleep(0.1)
        run = asyncio.run(burst(url, clients, max_tokens, late))
    if late:
        return run
    results = run["results"]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return dict(clients=clients, tokens=tokens, wall_s=round(run["wall"], 3),
                tokens_per_s=round(tokens / run["wall"], 1),
                ttft_p50_s=round(percentile(ttfts, 50), 3), ttft_p95_s=round(percentile(ttfts, 95), 3),
                latency_p50_s=round(percentile(latencies, 50), 3), latency_p95_s=round(percentile(latencies, 95), 3))


def measure_offline(model, clients: int, max_tokens: int) -> dict:
    from gptlab.inference import generate

    idx = torch.tensor(prompts(clients))  # (C, 32)
    generate(model, torch.tensor(prompts(clients, 99)), 4, temperature=0.8)  # warm-up, as the servers
    started = time.perf_counter()
    out = generate(model, idx, max_tokens, temperature=0.8, generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - started
    tokens = (out.size(1) - PROMPT_TOKENS) * clients
    return dict(clients=clients, tokens=tokens, wall_s=round(wall, 3), tokens_per_s=round(tokens / wall, 1))


def run_old(args: argparse.Namespace) -> None:
    """In the subprocess, on the old checkout's path: the previous server under the same load."""
    from gptlab.serve.limits import ServerLimits
    from gptlab.server import create_app, running_server

    model, tokenizer = build_model()
    rows = []
    for clients in args.clients:
        limits = ServerLimits(max_tokens=args.max_tokens, max_choices=1, max_batch=clients)
        rows.append(measure_server(create_app, running_server, limits, model, tokenizer, clients, args.max_tokens))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))


def old_server(args: argparse.Namespace) -> list[dict]:
    src = Path(args.old_src)
    if not (src / "gptlab" / "server.py").is_file():
        sys.exit(f"serve_load: error: no checkout of {OLD_COMMIT} at {src.parent}; create it with "
                 f"git worktree add --detach {src.parent} {OLD_COMMIT}")
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{Path(__file__).resolve().parent}")
    command = [sys.executable, __file__, "--old", "--threads", str(args.threads), "--max-tokens", str(args.max_tokens),
               "--clients", *map(str, args.clients)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--old-src", default="/tmp/old-serve/src", help=f"src/ of a checkout of {OLD_COMMIT}")
    parser.add_argument("--skip-old", action="store_true", help="leave the previous server out (quick runs)")
    parser.add_argument("--out", default="serve_load", help="results/<out>.json and .md")
    parser.add_argument("--old", action="store_true", help=argparse.SUPPRESS)  # the subprocess's role
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.old:
        run_old(args)
        return

    from gptlab.serve.limits import ServerLimits
    from gptlab.serve import create_app, running_server

    load_before = os.getloadavg()
    model, tokenizer = build_model()
    rows = []
    for clients in args.clients:
        limits = ServerLimits(max_tokens=args.max_tokens, max_choices=1, max_batch=clients, max_queue=4 * clients)
        offline = measure_offline(model, clients, args.max_tokens)
        engine = measure_server(create_app, running_server, limits, model, tokenizer, clients, args.max_tokens)
        probe = measure_server(create_app, running_server, limits, model, tokenizer, clients, args.max_tokens,
                               late=True)
        engine.update(vs_offline=round(engine["tokens_per_s"] / offline["tokens_per_s"], 2),
                      late_arrival_ttft_s=round(probe["probe_ttft"], 3), mean_step_s=round(probe["mean_step"], 3))
        rows.append(dict(clients=clients, offline=offline, engine=engine))
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_old:
        for row, old in zip(rows, old_server(args)):
            old["vs_offline"] = round(old["tokens_per_s"] / row["offline"]["tokens_per_s"], 2)
            row["previous"] = old
            row["engine"]["vs_previous"] = round(row["engine"]["tokens_per_s"] / old["tokens_per_s"], 1)
    write(rows, args, load_before, os.getloadavg())


def write(rows: list[dict], args: argparse.Namespace, before: tuple, after: tuple) -> None:
    from gptlab.fileio import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    load = f"load average {', '.join(f'{x:.2f}' for x in before)} before, {', '.join(f'{x:.2f}' for x in after)} after"
    meta = {"machine": MACHINE, "load": load, "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "prompt_tokens": PROMPT_TOKENS, "max_tokens": args.max_tokens,
            "previous_commit": OLD_COMMIT}
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps({**meta, "results": rows}, indent=2) + "\n")
    lines = [
        f"`gptlab serve` under load on {MACHINE}; {load}. GPT-2 124M shape (random weights), prompts of "
        f"{PROMPT_TOKENS} tokens, {args.max_tokens} sampled tokens per client, each client its own seed and "
        f"temperature, half streaming; server and clients in one process, {torch.get_num_threads()} torch thread(s).",
        "",
        "| clients | contender | tokens/s | vs offline `generate` | time to first token p50 / p95 | latency p50 / p95 |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        c = row["clients"]
        lines.append(f"| {c} | offline `generate`, batch {c} | {row['offline']['tokens_per_s']:.1f} | 1.00x | - | "
                     f"{row['offline']['wall_s']:.2f} s (all) |")
        for name, label in (("engine", "engine (continuous batching)"), ("previous", f"previous server ({OLD_COMMIT})")):
            r = row.get(name)
            if r is None:
                continue
            lines.append(f"| {c} | {label} | {r['tokens_per_s']:.1f} | {r['vs_offline']:.2f}x | "
                         f"{r['ttft_p50_s']:.2f} s / {r['ttft_p95_s']:.2f} s | "
                         f"{r['latency_p50_s']:.2f} s / {r['latency_p95_s']:.2f} s |")
    lines.append("")
    for row in rows:
        e = row["engine"]
        lines.append(f"- {row['clients']} clients: a request arriving mid-way got its first token after "
                     f"{e['late_arrival_ttft_s']:.3f} s; the engine's mean step took {e['mean_step_s']:.3f} s"
                     + (f"; the engine answered {e['vs_previous']}x the previous server's tokens/s" if "vs_previous" in e
                        else "") + ".")
    atomic_write_text(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
