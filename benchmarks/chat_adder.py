"""Chat tuning, checked by exact match: a small pretrained model learns to answer "What is 38 + 47?" with "85".

The steps, each the real command line in a fresh process and timed:
1. a byte-level BPE of 320 tokens learned on Tiny Shakespeare (`gptlab tokenizer train`): digits stay single
   tokens, so the sums are spelled digit by digit;
2. a small base model pretrained on Tiny Shakespeare with it (`gptlab prepare`, `gptlab train`);
3. the base tuned on 9,000 of the 10,000 problems a + b (a, b in 0..99) phrased as conversations
   (`gptlab train --init-from BASE --task chat --data FILE`) for 9 minutes (`--max-time`, the learning-rate
   schedule run on the clock), whatever the machine's speed.
The 1,000 problems held out are asked through `/v1/chat/completions` (greedy, 16 clients at once) of the
base (served with the chat template added, its weights unchanged) and of the tuned run; a reply counts when
it is exactly the sum.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/chat_adder.py
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gptlab.chat import CHAT_TEMPLATE
from gptlab.checkpoint import load_model
from gptlab.serve import create_app, running_server
from gptlab.tokenizers import load_tokenizer

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

GPTLAB = [sys.executable, "-m", "gptlab"]
CORPUS = Path("/work/shared/data/tinyshakespeare/input.txt")
BASE = ["--n-layer", "2", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "32",
        "--max-iters", "100", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-iters", "20", "--eval-interval", "0",
        "--eval-iters", "4", "--sample-tokens", "0"]
TUNE = ["--block-size", "64", "--batch-size", "128", "--max-iters", "100000", "--max-time", "540", "--decay-by-time",
        "--warmup-fraction", "0.05", "--lr", "3e-3", "--min-lr", "3e-4", "--eval-interval", "0", "--eval-iters", "4",
        "--sample-tokens", "0", "--weight-decay", "0.0"]


def problems() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(0).shuffle(pairs)
    return pairs[:9000], pairs[9000:]


def conversation(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": str(a + b)}]}


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([*GPTLAB, *args, "--no-progress"] if args[0] == "train" else [*GPTLAB, *args], check=True,
                   capture_output=True, text=True)
    return time.perf_counter() - start


def exact_match(run: Path, test: list[tuple[int, int]]) -> tuple[float, list[str]]:
    """The share of held-out problems whose greedy reply through /v1/chat/completions is exactly the sum."""
    app = create_app(load_model(run), load_tokenizer(run), "adder", allowed_hosts=["127.0.0.1", "localhost"])
    with running_server(app) as url, httpx.Client(timeout=300) as client:
        def ask(pair: tuple[int, int]) -> str:
            body = {"messages": conversation(*pair)["messages"][:1], "temperature": 0, "max_tokens": 6}
            response = client.post(url + "/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(ask, test))
    right = [reply == str(a + b) for (a, b), reply in zip(test, replies)]
    wrong = [f"{a} + {b} -> {reply!r}" for (a, b), reply, ok in zip(test, replies, right) if not ok][:5]
    return sum(right) / len(test), wrong


def main() -> None:
    train, test = problems()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seconds = {"tokenizer": timed(["tokenizer", "train", str(CORPUS), "--vocab-size", "320",
                                       "--out", str(work / "bpe")])}
        seconds["prepare"] = timed(["prepare", str(CORPUS), "--tokenizer", str(work / "bpe"), "--out", str(work / "data")])
        seconds["pretrain"] = timed(["train", "--data", str(work / "data"), "--out", str(work / "base"), *BASE])
        data = work / "adder.jsonl"
        data.write_text("".join(json.dumps(conversation(a, b)) + "\n" for a, b in train))
        seconds["tune"] = timed(["train", "--init-from", str(work / "base"), "--task", "chat", "--data", str(data),
                                 "--out", str(work / "tuned"), *TUNE])
        tokenizer = load_tokenizer(work / "base")  # the base with the template added, so the API can ask it
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save(work / "base")
        start = time.perf_counter()
        before, _ = exact_match(work / "base", test)
        after, mistakes = exact_match(work / "tuned", test)
        seconds["ask 2 x 1,000 problems"] = time.perf_counter() - start
        report = json.loads((work / "tuned" / "report.json").read_text())
    results = {"machine": MACHINE, "held_out_problems": len(test), "exact_match_before": before,
               "exact_match_after": after, "seconds": seconds, "tune_steps": report["steps"],
               "tune_val_loss": report["val_loss"], "mistakes": mistakes, "base": BASE, "tune": TUNE}
    table = "\n".join([
        "# Chat tuning: addition as conversations", "",
        f"Machine: {MACHINE}.", "",
        "\"What is a + b?\" (a, b in 0..99; 9,000 problems tuned on, 1,000 held out), asked through "
        "`/v1/chat/completions` with greedy decoding; exact match of the reply. Written by "
        "`benchmarks/chat_adder.py`.", "",
        "| model | held-out exact match |", "| --- | ---: |",
        f"| base (Tiny Shakespeare, 100 steps), template added | {before:.1%} |",
        f"| tuned (`train --task chat`, {report['steps']} steps) | **{after:.1%}** |", "",
        "| step | seconds |", "| --- | ---: |",
        *[f"| {name} | {value:.1f} |" for name, value in seconds.items()], "",
        *([f"Some mistakes: {'; '.join(mistakes)}", ""] if mistakes else []),
    ])
    save_results("chat_adder", results, table)


if __name__ == "__main__":
    main()
