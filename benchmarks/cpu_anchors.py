"""CPU decoding against the engine people deploy with: gptlab (float32, bf16, int8) and llama.cpp (F32, F16,
Q8_0 of the same model, written by `gptlab export --format gguf`), side by side in one run.

One GPT-2 124M-shaped model with random weights; batch 1; a 128-token prompt continued by 128 greedy tokens;
every engine on the same number of threads (2 by default). Rounds alternate the engines, each going first in
turn; a configuration's figure is its median round (its best in brackets). A decoding step reads every weight
matrix once plus the KV cache, so each row also gives its bytes per token x tokens/s against the machine's
read bandwidth measured here (the sum of a tensor far larger than the caches, on the same threads): the
fraction of the limit an engine reaches. Step time = (a 128-token call - a 1-token call) / 127.

llama.cpp runs through llama-cpp-python (measured only where it is installed: `pip install llama-cpp-python`
compiles it) with a Python loop around `Llama.eval` like gptlab's own, its greedy token taken from the
logits. bf16 runs only where the CPU has bf16 instructions (avx512_bf16 or AMX): elsewhere torch emulates it.
Greedy agreement: the share of the 128 tokens equal to gptlab float32's, and the length of the common prefix
(random weights make near-ties common: a flipped near-tie sends the rest of the text elsewhere).

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/cpu_anchors.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gptlab import generate
from gptlab.config import model_preset
from gptlab.gguf_export import write_gguf
from gptlab.model import GPT
from gptlab.kernels import chooser
from gptlab.quantize import Int8Linear, quantize_int8, quantize_int8_where_faster
from gptlab.tokenizers import GPT2Tokenizer

from generate import cache_bytes_per_step, read_bandwidth, weight_bytes  # benchmarks/generate.py
from machine import MACHINE, RESULTS, _cpu, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

GGUF_FORMATS = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0"}


def has_native_bf16() -> bool:
    flags = _cpu()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Gptlab:
    """gptlab's public `generate`, greedy."""

    def __init__(self, model: GPT, dtype: str) -> None:
        self.model, self.dtype = model, dtype

    def run(self, prompt: list[int], new_tokens: int) -> list[int]:
        out = generate(self.model, torch.tensor([prompt]), new_tokens, temperature=0)
        return out[0, len(prompt):].tolist()

    def step_bytes(self, prompt: int, new: int) -> float:
        """A layer whose last decoding step went through a kept copy (float, bf16, or fbgemm's packed int8) read that copy, not its
        int8 matrix (which path a layer takes depends on the thread count the engine's last step ran at)."""
        element = 2 if self.dtype == "bf16" else 4  # the cache keeps the activations' dtype
        copies = sum(m.float_copy.kept_bytes(m.float_copy.last_decoding) - m.weight.nbytes
                     for m in self.int8_layers() if m.float_copy.last_decoding in m.float_copy.values)
        return weight_bytes(self.model) + copies + cache_bytes_per_step(self.model, 1, prompt, new, element)

    def int8_layers(self) -> list[Int8Linear]:
        return [m for m in self.model.modules() if isinstance(m, Int8Linear)]


class LlamaCpp:
    """llama.cpp through llama-cpp-python: eval the prompt, then one token at a time, greedy."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        import gguf
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)
        reader = gguf.GGUFReader(path)
        # every matrix is read once per token (token_embd as the tied output head); of position_embd one row
        self.weight_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "position_embd.weight")
        self.n_layer = int(reader.fields["gpt2.block_count"].contents())
        self.n_embd = int(reader.fields["gpt2.embedding_length"].contents())

    def run(self, prompt: list[int], new_tokens: int) -> list[int]:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            if len(out) < new_tokens:
                llm.eval([token])
        return out

    def step_bytes(self, prompt: int, new: int) -> float:
        return self.weight_bytes + 2 * self.n_layer * (prompt + new / 2) * self.n_embd * 2  # float16 KV cache


def timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median round counts")
    parser.add_argument("--name", default="cpu_anchors", help="results/NAME.json and results/NAME.md")
    parser.add_argument("--quality-seconds", type=float, default=90.0,
                        help="train a character model on Tiny Shakespeare this long and compare its int8 weights' "
                             "quality with float32's (results/int8_quality); 0 skips")
    parser.add_argument("--only-quality", action="store_true", help="the quality comparison alone, no speeds")
    parser.add_argument("--corpus", type=Path, default=None, help="Tiny Shakespeare's input.txt (default: "
                        "benchmarks/shakespeare.py's, ../shared/data/tinyshakespeare/input.txt)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quality_seconds > 0:
        int8_quality(args.quality_seconds, args.corpus)
    if args.only_quality:
        return
    n, p = args.new_tokens, args.prompt_tokens

    load_before = [round(x, 2) for x in os.getloadavg()]
    bandwidth = read_bandwidth()
    torch.manual_seed(0)
    model = GPT(model_preset("gpt2")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (p,), generator=torch.Generator().manual_seed(1)).tolist()
    engines: dict[str, object] = {"gptlab float32": Gptlab(model, "float32")}
    if has_native_bf16():
        engines["gptlab bf16"] = Gptlab(copy.deepcopy(model).to(torch.bfloat16), "bf16")
    int8 = copy.deepcopy(model)
    kept = quantize_int8_where_faster(int8)  # what --quantize int8 runs: int8 only where a whole step is faster
    verdict = next((chooser.entry(k) for k in chooser._chosen if k[0] == "int8 decoding step"), None) or {}
    engines["gptlab int8" if kept else "gptlab --quantize int8 (float weights kept)"] = Gptlab(int8, "int8" if kept else "float32")
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            skipped.append("llama.cpp: llama-cpp-python is not installed")
        else:
            for label, quantize in GGUF_FORMATS.items():
                path = Path(tmp) / f"model-{quantize}.gguf"
                write_gguf(model, GPT2Tokenizer(), path, quantize, name="gpt2-random")
                engines[f"llama.cpp {label}"] = LlamaCpp(path, args.threads, p + n)

        names = list(engines)
        for name in names:  # warm-up: first calls allocate, and gptlab measures its kernels
            engines[name].run(prompt, 4)
        whole: dict[str, list[float]] = {name: [] for name in names}
        first: dict[str, list[float]] = {name: [] for name in names}
        tokens: dict[str, list[int]] = {}
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[: i % len(names)]:
                t, tokens[name] = timed(lambda: engines[name].run(prompt, n))
                whole[name].append(t)
                first[name].append(timed(lambda: engines[name].run(prompt, 1))[0])
                print(f"round {i} {name}: {t:.2f} s", flush=True)

        rows = []
        reference = tokens["gptlab float32"]
        for name in names:
            # a round whose one-token call met a burst of other work can come out negative: not a step time
            steps = sorted(s for s in ((w - f) / (n - 1) for w, f in zip(whole[name], first[name])) if s > 0) or [float("inf")]
            step, best = statistics.median(steps), steps[0]
            step_bytes = engines[name].step_bytes(p, n)
            rows.append(dict(
                engine=name, decode_tok_s=1 / step, best_decode_tok_s=1 / best,
                prefill_tok_s=p / statistics.median(first[name]), whole_seconds=whole[name],
                first_token_seconds=first[name], step_bytes=step_bytes, gb_s=step_bytes / step / 1e9,
                bandwidth_fraction=step_bytes / step / bandwidth,
                agreement=sum(a == b for a, b in zip(tokens[name], reference)) / n,
                common_prefix=common_prefix(tokens[name], reference)))
            if name == "gptlab int8":  # (a model that kept its float weights has no Int8Linear)
                layers = engines[name].int8_layers()
                paths = Counter(m.float_copy.last_decoding for m in layers)
                rows[-1]["layers_on_float_copy"] = ", ".join(f"{n} of {len(layers)} through \"{c}\"" for c, n in paths.items())
    base = rows[0]["decode_tok_s"]
    for row in rows:
        row["vs_gptlab_float32"] = row["decode_tok_s"] / base
    report = dict(machine=MACHINE, threads=args.threads, torch=torch.__version__, python=platform.python_version(),
                  prompt_tokens=p, new_tokens=n, rounds=args.rounds, read_gb_s=bandwidth / 1e9,
                  load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()],
                  skipped=skipped, rows=rows, int8_verdict=verdict.get("reason", "pinned or plain"),
                  previous=previous_run(args.name))
    save_results(args.name, report, markdown(report))


def int8_quality(seconds: float, corpus: Path | None = None) -> None:
    """A character model trained on Tiny Shakespeare for `seconds` (preset shakespeare-char-cpu, one process,
    not compiled), then its int8 weights against its float32 ones, as benchmarks/shakespeare.py compares
    them (whole-split validation loss, the same most likely next character, greedy continuations), with
    each layer's product as measured here, and the validation loss through each int8 product forced in
    turn (every layer on it), since which one a layer takes depends on the machine."""
    from gptlab.checkpoint import load_model
    from gptlab.data import TokenDataset, prepare
    from gptlab.kernels import CANDIDATES, force
    from shakespeare import CORPUS, int8_comparison, whole_split_loss

    corpus = corpus or CORPUS
    if not corpus.is_file():
        print(f"int8 quality: skipped: the shared Tiny Shakespeare corpus is not at {corpus} (--corpus names it)")
        return
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare([str(corpus)], "char", work / "data", val_fraction=0.1)
        run = work / "run"
        subprocess.run([sys.executable, "-m", "gptlab", "train", "--preset", "shakespeare-char-cpu", "--data",
                        str(work / "data"), "--out", str(run), "--sample-tokens", "0", "--max-time", str(seconds),
                        "--nproc", "1", "--no-compile", "--no-progress"], check=True)
        model = load_model(run).eval()
        dataset = TokenDataset(work / "data")
        block = model.config.block_size
        with torch.inference_mode():
            float_loss, count = whole_split_loss(model, dataset, "val", block)
        comparison = int8_comparison(model, dataset, block, float_loss)
        forced = {}
        quantized = quantize_int8(copy.deepcopy(model))
        for path in CANDIDATES["int8"]:
            with force(int8=path), torch.inference_mode():
                forced[path] = whole_split_loss(quantized, dataset, "val", block)[0]
    report = dict(machine=MACHINE, threads=torch.get_num_threads(), train_seconds=seconds,
                  model=f"{model.config.n_layer} layers, {model.config.n_head} heads, {model.config.n_embd} wide, "
                        f"context {block}, {model.num_parameters():,} parameters",
                  float32_val_loss=float_loss, val_tokens=count, int8=comparison, forced_paths_val_loss=forced,
                  load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()])
    q = comparison
    lines = [
        f"Machine: {MACHINE}; {report['threads']} threads; load average {load_before} before, {report['load_after']} "
        f"after. A character model ({report['model']}) trained on Tiny Shakespeare for {seconds:.0f} s "
        "(`--preset shakespeare-char-cpu --nproc 1 --no-compile`), scored on the whole validation split "
        f"({count:,} characters).", "",
        "| weights | validation loss | vs float32 | same most likely next character | greedy tokens equal "
        "(8 prompts x 200) |", "| --- | ---: | ---: | ---: | ---: |",
        f"| float32 | {float_loss:.4f} | - | - | - |",
        f"| int8, each layer's product as measured here | {q['val_loss']:.4f} | {q['relative_change']:+.2%} "
        f"| {q['top1_agreement']:.1%} | {q['greedy_tokens_equal']:.0%} |",
    ]
    lines += [f"| int8, every layer through \"{path}\" | {loss:.4f} | {loss / float_loss - 1:+.2%} | | |"
              for path, loss in forced.items()]
    lines += ["", "Greedy continuations: first difference after " + ", ".join(
        str(n) for n in q["greedy_tokens_before_first_difference"]) + " tokens. A path this machine cannot run "
        "falls back to dequantizing (its row then repeats that one's loss)."]
    save_results("int8_quality", report, "\n".join(lines) + "\n")


def previous_run(name: str) -> dict | None:
    """The last run's decoding speeds and load (results/NAME.json before this run replaces it), for a before/after."""
    try:
        last = json.loads((RESULTS / f"{name}.json").read_text())
        return dict(load_before=last["load_before"], decode_tok_s={
            r["engine"]: [round(r["decode_tok_s"], 1), round(r["best_decode_tok_s"], 1)] for r in last["rows"]})
    except (OSError, ValueError, KeyError):
        return None


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}; {report['threads']} threads for every engine; load average "
        f"{report['load_before']} before, {report['load_after']} after (the machine is shared). Read bandwidth "
        f"on {report['threads']} threads (the best of 7 sums and maxima of a 512 MB float32 tensor): {report['read_gb_s']:.1f} GB/s.",
        f"Model: GPT-2 124M shape, random weights; batch 1; a {report['prompt_tokens']}-token prompt, "
        f"{report['new_tokens']} greedy tokens; {report['rounds']} alternating rounds, median (best).",
        "",
        "| engine | decode tok/s | vs gptlab float32 | read per token | GB/s | of the read limit | prefill tok/s "
        "| greedy tokens = gptlab float32's | common prefix |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['engine']} | {r['decode_tok_s']:.1f} ({r['best_decode_tok_s']:.1f}) | {r['vs_gptlab_float32']:.2f}x "
            f"| {r['step_bytes'] / 1e6:.0f} MB | {r['gb_s']:.1f} | {r['bandwidth_fraction']:.0%} "
            f"| {r['prefill_tok_s']:.0f} | {r['agreement']:.0%} | {r['common_prefix']} |")
    lines += [
        "",
        "decode tok/s = 1 / step, step = (a whole call - a call for one new token) / (new tokens - 1). Read per "
        "token: every weight matrix once (the tied head once; llama.cpp's bytes are its GGUF tensors') plus the KV "
        "cache at its mean length (llama.cpp's is float16). Of the read limit: bytes per token x tok/s over the "
        "measured read bandwidth. Prefill tok/s: prompt tokens over a one-new-token call.",
    ]
    int8 = next((r for r in report["rows"] if "layers_on_float_copy" in r), None)
    if int8:
        lines += ["", f"int8: the linear layers' last decoding step went {int8['layers_on_float_copy']} (each layer's "
                      "product measured at the thread count the engine's step ran at; a kept copy's bytes are counted "
                      "above where a layer read it)."]
    lines += ["", f"--quantize int8 checks a whole decoding step against the float weights where it runs and keeps "
                  f"the faster: {report['int8_verdict']}. Quality of int8 on a trained model (validation loss, "
                  "greedy agreement): benchmarks/results/int8_quality.md."]
    before = report.get("previous")
    if before:
        lines += ["", f"The previous run (load average {before['load_before']}), decode tok/s median (best): " + ", ".join(
            f"{engine} {median} ({best})" for engine, (median, best) in before["decode_tok_s"].items()) + "."]
    if report["skipped"]:
        lines += ["", "Not measured: " + "; ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
