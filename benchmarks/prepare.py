"""gptlab prepare on generated corpora of 50 MB, 500 MB and 2 GB: throughput and peak memory of the
whole process tree (the command and its tokenizer workers), against single-process tiktoken
measured in the same run.

The corpus is deterministic and shaped for BPE: a pool of paragraphs of words drawn with Zipf
frequencies (GPT-2's commonest word tokens first, then a tail of rarer and made-up words), with
capitals, punctuation and numbers; documents are 1 to 8 paragraphs drawn from the pool. It is
written as JSON lines (one document per record) at every size and as one plain text file at
50 and 500 MB. Each `prepare --tokenizer gpt2` runs in its own process, as a user would run it,
sampled every 0.2 s for the resident memory (RSS, and PSS, which counts pages the forked workers
share with their parent once) of the process and its workers. Its MB/s is text bytes over the
time of the `prepare` call (Python's and torch's import excluded). Single-process tiktoken is
gptlab's GPT-2 tokenizer encoding the same documents in this process, before and after the runs;
the target is prepare >= 85% of (cores x single-process).

Needs Linux (/proc) and about 6 GB free in the temporary directory; removes what it generated.
About 10 minutes on 2 cores (the 2 GB run is most of it), a few on 16.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/prepare.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import gptlab
from gptlab.data.workers import available_cores
from gptlab.tokenizers import GPT2Tokenizer

from machine import MACHINE  # benchmarks/machine.py: a script's own folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1_000_000


def paragraph_pool(megabytes: int, seed: int = 0) -> list[str]:
    """Paragraphs of Zipf-distributed words, about `megabytes` of distinct text in all.

    The 6,000 commonest words are GPT-2's own word tokens in merge order (roughly frequency order, and
    each one token, as common words are in real text); the long tail mixes rarer GPT-2 words with
    made-up ones that BPE must split, as names and rare words are."""
    rng = np.random.default_rng(seed)
    vocab = json.loads((Path(gptlab.__file__).parent / "assets" / "gpt2_vocab.json").read_text(encoding="utf-8"))
    real = [t[1:] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
            if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and len(t) > 2]
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "st", "th",
              "tr", "pl", "sh", "gr"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck", "m"]
    made_up = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                              for _ in range(int(rng.choice([2, 3], p=[0.7, 0.3])))) for _ in range(20_000)})
    tail = rng.permutation(real[6000:26000] + made_up[:15000]).tolist()
    words = np.array(real[:6000] + tail, dtype=object)
    weights = 1.0 / (np.arange(len(words)) + 2.7)  # Zipf-Mandelbrot
    capitals = np.array([w[:1].upper() + w[1:] for w in words], dtype=object)
    pool, size = [], 0
    while size < megabytes * MB:
        n = 200_000
        ids = rng.choice(len(words), size=n, p=weights / weights.sum())
        text = words[ids]
        ends = np.cumsum(rng.integers(4, 28, size=n // 4))
        ends = ends[ends < n - 1]
        starts = np.concatenate([[0], ends + 1])
        text[starts] = capitals[ids[starts]]
        numbers = rng.random(n) < 0.01
        text[numbers] = rng.integers(0, 2000, size=int(numbers.sum())).astype(str).astype(object)
        separators = np.where(rng.random(n) < 0.07, ", ", " ").astype(object)
        separators[ends] = rng.choice([". ", ". ", ". ", "? ", "! ", "; "], size=len(ends))
        words_out = (text + separators).tolist()
        bounds = np.cumsum(rng.integers(40, 260, size=n // 40))
        for a, b in zip(np.concatenate([[0], bounds[:-1]]), bounds):
            if b > len(words_out):
                break
            paragraph = "".join(words_out[a:b]).rstrip(" ,;") + "."
            pool.append(paragraph)
            size += len(paragraph)
    return pool


def write_corpora(directory: Path, pool: list[str], megabytes: int, seed: int) -> tuple[Path, Path | None, int]:
    """corpus.jsonl (and, for the smaller sizes, corpus.txt) of about `megabytes`; returns the text bytes."""
    rng = np.random.default_rng(seed)
    escaped = [json.dumps(p)[1:-1] for p in pool]
    sizes = np.array([len(p.encode()) for p in pool])
    jsonl, text_bytes = directory / f"corpus-{megabytes}.jsonl", 0
    with jsonl.open("w", encoding="utf-8") as handle:
        while text_bytes < megabytes * MB:
            picks = [rng.choice(len(pool), size=int(k)) for k in rng.integers(1, 9, size=1000)]
            handle.write("".join('{"id": %d, "text": "%s"}\n' % (i, "\\n\\n".join(escaped[j] for j in doc))
                                 for i, doc in enumerate(picks)))
            text_bytes += sum(int(sizes[doc].sum()) + 2 * (len(doc) - 1) for doc in picks)
    plain = None
    if megabytes <= 500:
        plain, written = directory / f"corpus-{megabytes}.txt", 0
        with plain.open("w", encoding="utf-8") as handle:
            while written < megabytes * MB:
                chunk = "\n\n".join(pool[j] for j in rng.choice(len(pool), size=2000)) + "\n\n"
                handle.write(chunk)
                written += len(chunk.encode())
    return jsonl, plain, text_bytes


def single_process(pool: list[str], seconds: float = 15.0) -> dict:
    """gptlab's GPT-2 tokenizer in this process, one document at a time as a worker encodes them, and
    tiktoken's own batch encoding with a thread per core: MB/s of wall time and per CPU-second."""
    tok, rng = GPT2Tokenizer(), np.random.default_rng(1)
    docs = ["\n\n".join(pool[j] for j in rng.choice(len(pool), size=int(rng.integers(1, 9)))) for _ in range(4000)]
    result = {}
    for name, encode in (("one_process", lambda batch: [tok.encode(d) for d in batch]),
                         ("tiktoken_threads", lambda batch: tok._encoding.encode_ordinary_batch(
                             batch, num_threads=available_cores()))):
        done, wall, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
            batch = [docs[j] for j in rng.integers(0, len(docs), size=64)]
            encode(batch)
            done += sum(len(d.encode()) for d in batch)
        result[name] = {"mb_per_s": round(done / MB / (time.perf_counter() - wall), 3),
                        "mb_per_cpu_s": round(done / MB / (time.process_time() - cpu), 3)}
    return result


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process, 0 when it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return 0, 0
    return (int(fields["Rss"].split()[0]) * 1024, int(fields["Pss"].split()[0]) * 1024)


DRIVER = """
import json, resource, sys, time
from gptlab.data import prepare
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
start, cpu_start = time.perf_counter(), cpu()
meta = prepare([sys.argv[1]], "gpt2", sys.argv[2], show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": cpu() - cpu_start,
                  "tokens": meta["train_tokens"] + meta["val_tokens"]}))
"""


def run_prepare(corpus: Path, out: Path) -> dict:
    process = subprocess.Popen([sys.executable, "-c", DRIVER, str(corpus), str(out)], stdout=subprocess.PIPE)
    peaks = {"rss": 0, "pss": 0, "processes": 0}

    def sample() -> None:
        while process.poll() is None:
            tree = _tree(process.pid)
            memory = [_memory(p) for p in tree]
            peaks["rss"] = max(peaks["rss"], sum(m[0] for m in memory))
            peaks["pss"] = max(peaks["pss"], sum(m[1] for m in memory))
            peaks["processes"] = max(peaks["processes"], len(tree))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, _ = process.communicate()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"prepare failed on {corpus}")
    result = json.loads(stdout)
    shutil.rmtree(out)
    return {**result, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,500,2000", help="corpus sizes in MB")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where to generate the corpora")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cores = available_cores()
    free = shutil.disk_usage(args.tmp).free
    if free < 3 * max(sizes) * MB:
        raise SystemExit(f"{args.tmp} has {free / 1e9:.1f} GB free; the corpora and their tokens need "
                         f"{3 * max(sizes) / 1000:.1f} GB")
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="gptlab-prepare-bench-") as work:
        work_dir = Path(work)
        pool = paragraph_pool(32)
        before = single_process(pool)
        print(f"{cores} cores; before: {json.dumps(before)}", flush=True)
        for size in sizes:
            jsonl, plain, text_bytes = write_corpora(work_dir, pool, size, seed=size)
            for kind, corpus in (("JSON lines", jsonl), ("plain text", plain)):
                if corpus is None:
                    continue
                measured = run_prepare(corpus, work_dir / "out")
                text = text_bytes if kind == "JSON lines" else corpus.stat().st_size
                row = {"corpus": kind, "megabytes": round(text / MB), "file_megabytes": round(corpus.stat().st_size / MB),
                       "seconds": round(measured["seconds"], 2), "mb_per_s": round(text / MB / measured["seconds"], 3),
                       "mb_per_cpu_s": round(text / MB / measured["cpu_seconds"], 3), "tokens": measured["tokens"],
                       "peak_rss_mb": round(measured["rss"] / MB), "peak_pss_mb": round(measured["pss"] / MB),
                       "processes": measured["processes"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
                corpus.unlink()
        after = single_process(pool)
        print(f"after: {json.dumps(after)}", flush=True)
    single = {key: (before["one_process"][key] + after["one_process"][key]) / 2 for key in ("mb_per_s", "mb_per_cpu_s")}
    for row in rows:
        row["of_cores_x_single"] = round(row["mb_per_s"] / (cores * single["mb_per_s"]), 3)
        row["per_cpu_s_of_single"] = round(row["mb_per_cpu_s"] / single["mb_per_cpu_s"], 3)
    result = {"machine": MACHINE, "cores": cores, "load_average_start": [round(x, 2) for x in load_start],
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "single": {"before": before, "after": after}, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prepare.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "prepare.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    before, after = result["single"]["before"], result["single"]["after"]
    lines = [
        f"`gptlab prepare --tokenizer gpt2` on generated corpora ({result['machine']}; load average "
        f"{result['load_average_start'][0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end).",
        "",
        f"Single-process tiktoken (gptlab's GPT-2 tokenizer, one document at a time, in the benchmark's process): "
        f"{before['one_process']['mb_per_s']:.2f} MB/s before the runs and {after['one_process']['mb_per_s']:.2f} "
        f"after ({before['one_process']['mb_per_cpu_s']:.2f} and {after['one_process']['mb_per_cpu_s']:.2f} MB per "
        f"CPU-second). tiktoken's own batch encoding with {result['cores']} threads: "
        f"{before['tiktoken_threads']['mb_per_s']:.2f} and {after['tiktoken_threads']['mb_per_s']:.2f} MB/s (it holds "
        "the GIL, so threads add nothing; prepare uses processes).",
        "",
        f"| corpus | text | time | MB/s | of {result['cores']} x single | MB per CPU-second, of single's "
        "| peak RSS, all processes | peak PSS | processes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['corpus']} | {row['megabytes']:,} MB | {row['seconds']:.1f} s | {row['mb_per_s']:.2f} "
                     f"| {100 * row['of_cores_x_single']:.0f}% | {100 * row['per_cpu_s_of_single']:.0f}% "
                     f"| {row['peak_rss_mb']:,} MB | {row['peak_pss_mb']:,} MB | {row['processes']} |")
    lines += ["", "MB/s is text over the time of the prepare call; 'of cores x single' compares it with the mean of "
              "the single-process rates measured before and after. Under load the machine's other work takes cores "
              "from both, so the CPU-second ratio (work done per CPU-second of the whole process tree, against "
              "single-process tiktoken's) shows prepare's own overhead apart from the load. RSS adds every process's "
              "resident pages, so the pages the forked workers share with their parent count once per process; "
              "PSS divides shared pages among the processes that map them.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
