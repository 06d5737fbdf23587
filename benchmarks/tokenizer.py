"""`gptlab tokenizer train` side by side with Hugging Face `tokenizers`' trainer and GPT-2's vocabulary, on
corpora found offline: the Python source of the installed packages and Tiny Shakespeare.

Code: the .py files of this environment's site-packages, one document per file, in a JSON lines file;
every 8th top-level package (in sorted order) is held out for validation, so the held-out text is code
the tokenizer never saw. Shakespeare: its first 90% for training, the last 10% held out.

For each corpus, in one run:
- training time and peak memory (RSS of the process and its children, sampled every 0.1 s) of
  `gptlab tokenizer train` against Hugging Face's BpeTrainer called directly (its ByteLevel GPT-2
  recipe, reading the same JSON lines) at the same vocabulary size, each in its own process, import
  time excluded; and whether the two learned the same merges. For code, `gptlab tokenizer train` on
  a quarter of the corpus too, to show how its memory grows with the corpus;
- bytes per token on the held-out text, against GPT-2's 50,257-token vocabulary;
- encoding speed through `gptlab prepare` (the whole command, its worker processes included), with
  the trained tokenizer and with GPT-2's, on the training corpus;
- (code only) the same small GPT trained for the same steps on each tokenization, scored on the same
  held-out text in bits per byte (`gptlab eval --text`), which is fair across vocabularies.

Defaults take a few minutes on 2 cores:

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path
from prepare import _memory, _tree  # the process-tree memory sampling of the prepare benchmark

MB = 1_000_000
SITE_PACKAGES = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"

GPTLAB_TRAIN = """
import json, sys, time
from gptlab.cli import main
import gptlab.data.tokenizer_training  # imported before the clock starts, as the HF side imports tokenizers
start = time.perf_counter()
code = main(["tokenizer", "train", sys.argv[1], "--vocab-size", sys.argv[2], "--out", sys.argv[3]])
print(json.dumps({"seconds": time.perf_counter() - start, "code": code}))
"""
HF_TRAIN = """
import json, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
start = time.perf_counter()
def texts():
    with open(sys.argv[1], encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]
hf = Tokenizer(models.BPE())
hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), special_tokens=["<|endoftext|>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
hf.train_from_iterator(texts(), trainer)
seconds = time.perf_counter() - start
merges = json.loads(hf.to_str())["model"]["merges"]
with open(sys.argv[3], "w", encoding="utf-8") as handle:
    handle.write("".join((" ".join(m) if isinstance(m, list) else m) + "\\n" for m in merges))
print(json.dumps({"seconds": seconds, "code": 0}))
"""
PREPARE = """
import json, sys, time
from gptlab.data import prepare
start = time.perf_counter()
meta = prepare([sys.argv[1]], sys.argv[2], sys.argv[3], show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "code": 0,
                  "tokens": meta["train_tokens"] + meta["val_tokens"]}))
"""


def measured(script: str, *args: str) -> dict:
    """Run `script` in its own Python process; its last stdout line (JSON) plus the tree's peak RSS."""
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], sum(_memory(p)[0] for p in _tree(process.pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, _ = process.communicate()
    sampler.join()
    result = json.loads(stdout.strip().splitlines()[-1])
    if process.returncode or result["code"]:
        raise SystemExit(f"failed: {args}")
    return {**result, "peak_rss_mb": round(peak[0] / MB)}


def gptlab_command(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"gptlab {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def code_corpus(train_mb: float, val_mb: float, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(train documents, held-out documents, held-out package names): .py files drawn at random from
    the training packages until `train_mb`, and from the held-out ones until `val_mb`."""
    packages = sorted(p for p in SITE_PACKAGES.iterdir()
                      if (p.is_dir() and not p.name.endswith((".dist-info", ".egg-info")) and p.name != "__pycache__")
                      or p.suffix == ".py")
    held_out = {p.name for i, p in enumerate(packages) if i % 8 == 7}
    files: dict[bool, list[Path]] = {False: [], True: []}
    for package in packages:
        found = [package] if package.is_file() else sorted(package.rglob("*.py"))
        files[package.name in held_out].extend(found)
    rng = random.Random(seed)
    documents = []
    for is_held_out, budget in ((False, train_mb), (True, val_mb)):
        paths, docs, size = files[is_held_out], [], 0
        rng.shuffle(paths)
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                docs.append(text)
                size += len(text.encode("utf-8"))
            if size >= budget * MB:
                break
        documents.append(docs)
    return documents[0], documents[1], sorted(held_out)


def write_jsonl(path: Path, docs: list[str]) -> int:
    with path.open("w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"text": doc}) + "\n")
    return sum(len(doc.encode("utf-8")) for doc in docs)


def bytes_per_token(tokenizer, docs: list[str]) -> float:
    return sum(len(d.encode("utf-8")) for d in docs) / sum(len(tokenizer.encode(d)) for d in docs)


def compare(name: str, train_docs: list[str], val_docs: list[str], vocab: int, work: Path,
            memory_fraction: float | None) -> dict:
    """Train both ways, then bytes per token and prepare's encoding rate; returns the corpus's row."""
    corpus = work / f"{name}.jsonl"
    text_bytes = write_jsonl(corpus, train_docs)
    row: dict = {"corpus": name, "train_mb": round(text_bytes / MB, 2), "documents": len(train_docs),
                 "held_out_mb": round(sum(len(d.encode()) for d in val_docs) / MB, 2), "vocab_size": vocab}
    row["gptlab_train"] = measured(GPTLAB_TRAIN, str(corpus), str(vocab), str(work / f"{name}-tok"))
    row["hf_train"] = measured(HF_TRAIN, str(corpus), str(vocab), str(work / f"{name}-hf-merges.txt"))
    row["time_vs_hf"] = round(row["gptlab_train"]["seconds"] / row["hf_train"]["seconds"], 3)
    ours = (work / f"{name}-tok" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    theirs = (work / f"{name}-hf-merges.txt").read_text(encoding="utf-8").splitlines()
    row["same_merges_as_hf"] = ours == theirs
    row["merges"] = len(ours)
    print(json.dumps(row), flush=True)
    if memory_fraction:
        part = work / f"{name}-part.jsonl"
        part_docs = train_docs[: max(1, int(len(train_docs) * memory_fraction))]
        row["gptlab_train_part"] = {"train_mb": round(write_jsonl(part, part_docs) / MB, 2),
                                    **measured(GPTLAB_TRAIN, str(part), str(vocab), str(work / f"{name}-tok-part"))}
    tok, gpt2 = load_tokenizer(work / f"{name}-tok"), GPT2Tokenizer()
    row["bytes_per_token"] = {"trained": round(bytes_per_token(tok, val_docs), 3),
                              "gpt2": round(bytes_per_token(gpt2, val_docs), 3)}
    row["bytes_per_token_vs_gpt2"] = round(row["bytes_per_token"]["trained"] / row["bytes_per_token"]["gpt2"], 3)
    for label, spec in (("trained", str(work / f"{name}-tok")), ("gpt2", "gpt2")):
        out = work / f"{name}-data-{label}"
        result = measured(PREPARE, str(corpus), spec, str(out))
        row[f"prepare_{label}"] = {**result, "mb_per_s": round(text_bytes / MB / result["seconds"], 3)}
    row["prepare_rate_vs_gpt2"] = round(row["prepare_trained"]["mb_per_s"] / row["prepare_gpt2"]["mb_per_s"], 3)
    print(json.dumps(row), flush=True)
    return row


def train_and_score(name: str, val_docs: list[str], work: Path, steps: int, eval_kb: int) -> dict:
    """The same small GPT on each tokenization of the corpus, then bits per byte on the same held-out text."""
    held_out = work / f"{name}-held-out.txt"
    text = "\n\n".join(val_docs)
    held_out.write_text(text.encode("utf-8")[: eval_kb * 1000].decode("utf-8", errors="ignore"), encoding="utf-8")
    model = ["--n-layer", "2", "--n-head", "4", "--n-embd", "128", "--block-size", "128", "--batch-size", "8",
             "--max-iters", str(steps), "--warmup-iters", str(max(1, steps // 10)), "--eval-interval", "0",
             "--eval-iters", "5", "--log-interval", "50", "--sample-tokens", "0", "--no-progress", "--seed", "0"]
    runs = {}
    for label in ("trained", "gpt2"):
        run = work / f"{name}-run-{label}"
        start = time.perf_counter()
        gptlab_command("train", "--data", str(work / f"{name}-data-{label}"), "--out", str(run), *model)
        seconds = time.perf_counter() - start
        scored = json.loads(gptlab_command("eval", str(run), "--text", str(held_out), "--json"))["model"]
        vocab = load_tokenizer(run).vocab_size
        runs[label] = {"vocab_size": vocab, "train_seconds": round(seconds, 1), "steps": steps,
                       "parameters": int(json.loads((run / "config.json").read_text())["vocab_size"]) * 128
                       + _block_parameters(), "held_out_tokens": scored["tokens"],
                       "bits_per_byte": round(scored["bits_per_byte"], 4)}
        print(json.dumps({label: runs[label]}), flush=True)
    return {"corpus": name, "held_out_bytes": len(held_out.read_bytes()), "runs": runs,
            "model": "2 layers, 4 heads, 128 wide, context 128, batch 8, AdamW, same seed"}


def _block_parameters(layers: int = 2, width: int = 128, context: int = 128) -> int:
    """Weights besides the token embedding (tied with the head): positions, blocks, final LayerNorm."""
    block = 12 * width * width + 13 * width  # attention and MLP matrices and biases, two LayerNorms
    return context * width + layers * block + 2 * width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-mb", type=float, default=20, help="MB of Python source to train on")
    parser.add_argument("--held-out-mb", type=float, default=2, help="MB of held-out packages' source")
    parser.add_argument("--code-vocab", type=int, default=32768, help="vocabulary size for code")
    parser.add_argument("--shakespeare-vocab", type=int, default=8192, help="vocabulary size for Shakespeare")
    parser.add_argument("--train-steps", type=int, default=100, help="steps of each small GPT (0: no training)")
    parser.add_argument("--shakespeare", type=Path, default=SHAKESPEARE, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--eval-kb", type=int, default=100, help="KB of held-out code the models are scored on")
    args = parser.parse_args()
    load_start = os.getloadavg()
    rows, skipped, training = [], [], None
    with tempfile.TemporaryDirectory(prefix="gptlab-tokenizer-bench-") as tmp:
        work = Path(tmp)
        train_docs, val_docs, held_out = code_corpus(args.code_mb, args.held_out_mb)
        rows.append({**compare("code", train_docs, val_docs, args.code_vocab, work, 0.25),
                     "held_out_packages": held_out})
        if args.train_steps:
            training = train_and_score("code", val_docs, work, args.train_steps, args.eval_kb)
        if args.shakespeare.is_file():
            text = args.shakespeare.read_text(encoding="utf-8")
            cut = text.rfind("\n\n", 0, int(len(text) * 0.9))
            rows.append(compare("shakespeare", [text[:cut]], [text[cut:]], args.shakespeare_vocab, work, None))
        else:
            skipped.append(f"Shakespeare: {args.shakespeare} not found (--shakespeare names it)")
    result = {"machine": MACHINE, "cores": os.cpu_count(), "load_average_start": [round(x, 2) for x in load_start],
              "load_average_end": [round(x, 2) for x in os.getloadavg()], "site_packages": str(SITE_PACKAGES),
              "rows": rows, "training": training, "skipped": skipped}
    save_results("tokenizer", result, markdown(result))


def markdown(result: dict) -> str:
    lines = [f"`gptlab tokenizer train` against Hugging Face `tokenizers`' trainer and GPT-2's vocabulary "
             f"({result['machine']}; load average {result['load_average_start'][0]:.1f} at the start, "
             f"{result['load_average_end'][0]:.1f} at the end: the machine was shared with other work, so the "
             "times are of a busy machine; both sides of each comparison ran under the same conditions, one after "
             "the other).", "",
             "| corpus | train text | vocabulary | gptlab train | HF trainer | time, of HF's | peak RSS gptlab / HF "
             "| same merges | held-out bytes/token, trained / GPT-2 | ratio | prepare MB/s, trained / GPT-2 | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        bpt = row["bytes_per_token"]
        lines.append(
            f"| {row['corpus']} | {row['train_mb']:.1f} MB | {row['vocab_size']:,} | {row['gptlab_train']['seconds']:.1f} s "
            f"| {row['hf_train']['seconds']:.1f} s | {row['time_vs_hf']:.2f}x "
            f"| {row['gptlab_train']['peak_rss_mb']:,} / {row['hf_train']['peak_rss_mb']:,} MB "
            f"| {'yes' if row['same_merges_as_hf'] else 'no'} | {bpt['trained']:.2f} / {bpt['gpt2']:.2f} "
            f"| **{row['bytes_per_token_vs_gpt2']:.2f}x** | {row['prepare_trained']['mb_per_s']:.2f} / "
            f"{row['prepare_gpt2']['mb_per_s']:.2f} | {100 * row['prepare_rate_vs_gpt2']:.0f}% |")
    lines.append("")
    code = next((row for row in result["rows"] if row["corpus"] == "code"), None)
    if code and "gptlab_train_part" in code:
        part = code["gptlab_train_part"]
        lines += [f"Memory against corpus size (code, `gptlab tokenizer train`): {part['train_mb']:.1f} MB of text "
                  f"{part['peak_rss_mb']:,} MB peak RSS in {part['seconds']:.1f} s; {code['train_mb']:.1f} MB "
                  f"{code['gptlab_train']['peak_rss_mb']:,} MB. The trainer keeps a count per distinct pre-tokenized "
                  "chunk, so memory follows the corpus's vocabulary of words, not its size; the text itself is "
                  "read a piece of at most a megabyte at a time.", "",
                  f"Held-out packages ({len(code['held_out_packages'])}): {', '.join(code['held_out_packages'])}.", ""]
    training = result.get("training")
    if training:
        lines += [f"The same small GPT ({training['model']}) trained on each tokenization of the code corpus, scored "
                  f"on the same {training['held_out_bytes'] / 1000:,.0f} KB of held-out code with `gptlab eval --text`:",
                  "", "| tokenizer | vocabulary | parameters | steps | train time | held-out tokens | bits per byte |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, run in training["runs"].items():
            lines.append(f"| {label} | {run['vocab_size']:,} | {run['parameters'] / 1e6:.2f} M | {run['steps']} "
                         f"| {run['train_seconds']:.0f} s | {run['held_out_tokens']:,} | **{run['bits_per_byte']:.3f}** |")
        lines.append("")
    lines += ["Times exclude Python's imports. gptlab's trainer is Hugging Face's BpeTrainer fed by prepare's readers "
              "(with GPT-2's pattern as a Split pre-tokenizer); 'HF trainer' is that trainer called directly with its "
              "ByteLevel GPT-2 recipe. Peak RSS is of the process and its children. Bytes per token: UTF-8 bytes of "
              "the held-out text over its tokens (higher is better). prepare MB/s: the whole `gptlab prepare` command "
              "on the training corpus, worker processes included. Train time: the whole `gptlab train` command "
              "(imports, the final evaluation and report included).", ""]
    lines += [f"Skipped: {reason}." for reason in result["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
