"""Kneser-Ney n-grams on one million characters: gptlab's numpy version against a plain-Python one.

Tiny Shakespeare with the benchmark convention of ../shared/data/README.md (65-character vocabulary
from the whole file, the first 90% train: 1,003,854 tokens, the last 10% validation). For each order,
gptlab.ngram fits on the train split and scores the validation split. A straightforward dictionary
implementation of the same interpolated Kneser-Ney (same discounts, same back-off) does the same for
one order in the same process: the ratio of the times is what vectorising buys, and equal validation
losses show both compute the same model.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/ngram.py
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from gptlab.evaluate.ngram import KneserNey, NGramCounts

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
ORDERS = range(1, 8)
REFERENCE_ORDER = 5


def load(corpus: Path) -> tuple[np.ndarray, np.ndarray, int]:
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    n_train = int(len(ids) * 0.9)
    return ids[:n_train], ids[n_train:], len(chars)


def reference_nll(train: list[int], val: list[int], vocab: int, order: int, discounts: list[float]) -> float:
    """Interpolated Kneser-Ney with dictionaries, one token at a time: the textbook formula as written."""
    counts: list[Counter] = [Counter() for _ in range(order + 1)]
    grams = [tuple(train[i - order + 1 : i + 1]) for i in range(order - 1, len(train))]
    counts[order] = Counter(grams)
    for k in range(order - 1, 0, -1):  # continuation counts: the distinct tokens seen just before
        longer = {tuple(train[i - k : i + 1]) for i in range(k, len(train))}
        counts[k] = Counter(g[1:] for g in longer)
    totals = [defaultdict(int) for _ in range(order + 1)]
    types = [defaultdict(int) for _ in range(order + 1)]
    for k in range(1, order + 1):
        for gram, c in counts[k].items():
            totals[k][gram[:-1]] += c
            types[k][gram[:-1]] += 1
    nll = 0.0
    for i in range(1, len(val)):
        p = 1.0 / vocab
        for k in range(1, order + 1):
            if i - k + 1 < 0:
                break
            context = tuple(val[i - k + 1 : i])
            total = totals[k].get(context, 0)
            if total == 0:
                continue
            d = discounts[k - 1]
            c = counts[k].get(context + (val[i],), 0)
            p = (max(c - d, 0.0) + d * types[k][context] * p) / total
        nll -= math.log(p)
    return nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="Tiny Shakespeare's input.txt")
    args = parser.parse_args()
    if not args.corpus.is_file():  # a fresh clone has no ../shared: say so and leave the results as they are
        print(f"benchmarks/ngram.py: skipped: the shared Tiny Shakespeare corpus is not at {args.corpus}")
        return
    load_before = round(os.getloadavg()[0], 2)
    train, val, vocab = load(args.corpus)
    rows = []
    start = time.perf_counter()
    counts = NGramCounts(train, vocab, max(ORDERS))
    count_seconds = time.perf_counter() - start
    for order in ORDERS:
        start = time.perf_counter()
        lm = KneserNey(counts, order)
        nll = -float(lm.log_probs(val).sum())
        rows.append({"order": order, "seconds": time.perf_counter() - start, "val_loss": nll / (len(val) - 1),
                     "bits_per_char": nll / math.log(2) / (len(val) - 1)})
    # one order, end to end, both ways
    start = time.perf_counter()
    lm = KneserNey(NGramCounts(train, vocab, REFERENCE_ORDER), REFERENCE_ORDER)
    fast_nll = -float(lm.log_probs(val).sum())
    fast = time.perf_counter() - start
    start = time.perf_counter()
    slow_nll = reference_nll(train.tolist(), val.tolist(), vocab, REFERENCE_ORDER, lm.discounts[1:])
    slow = time.perf_counter() - start
    payload = {
        "machine": MACHINE, "python": platform.python_version(), "numpy": np.__version__,
        "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
        "train_tokens": len(train), "val_tokens": len(val), "vocab": vocab,
        "count_seconds_orders_1_to_max": count_seconds, "orders": rows,
        "reference": {"order": REFERENCE_ORDER, "numpy_seconds": fast, "python_seconds": slow,
                      "speedup": slow / fast, "numpy_val_loss": fast_nll / (len(val) - 1),
                      "python_val_loss": slow_nll / (len(val) - 1)},
    }
    save_results("ngram", payload, markdown(payload))


def markdown(p: dict) -> str:
    ref = p["reference"]
    lines = [
        f"Interpolated Kneser-Ney on Tiny Shakespeare, {p['train_tokens']:,} train / {p['val_tokens']:,} validation "
        f"characters ({p['machine']}; load average {p['load_before']} before / {p['load_after']} after).",
        "",
        f"Counting every n-gram of orders 1-{len(p['orders'])} once: {p['count_seconds_orders_1_to_max']:.2f} s. Then per order:",
        "",
        "| order | model + scoring the validation split | val loss (nats/char) | bits/char |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['order']} | {r['seconds']:.2f} s | {r['val_loss']:.4f} | {r['bits_per_char']:.4f} |"
              for r in p["orders"]]
    lines += [
        "",
        f"Order {ref['order']} end to end (count, fit, score): numpy {ref['numpy_seconds']:.2f} s, plain Python "
        f"dictionaries {ref['python_seconds']:.1f} s, **{ref['speedup']:.0f}x**; validation loss "
        f"{ref['numpy_val_loss']:.6f} vs {ref['python_val_loss']:.6f} nats/char.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
