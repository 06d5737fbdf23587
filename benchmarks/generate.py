"""Decoding speed: gptlab (float32, bf16 weights, int8 weights) against transformers, side by side.

One GPT-2 124M-shaped model with random weights is saved once in the Hugging Face format and loaded
both into gptlab and into `transformers.GPT2LMHeadModel`. Each configuration continues random
128-token prompts by 128 greedy tokens through the public `gptlab.generate`. Runs of the contenders
alternate, and each reports its fastest repeat: other work on the machine can only add time, so the
minimum is the least disturbed figure. In float32 the script asserts that gptlab (with and without
cache) and transformers produce the same tokens.

A decoding step reads every weight once, plus the KV cache, so memory bandwidth is its limit: each row
gives the bytes a step reads over the time of one step (the whole call less a prefill-only call, per
new token), against the machine's read bandwidth measured here on a tensor far larger than its caches.
int8 is `gptlab.quantize.quantize_int8` of the float32 model (weights int8, activations float32), with
the share of its greedy tokens equal to float32's (random weights make near-ties common: the
Shakespeare benchmark gives the rate and the loss of a trained model).

Bounded: about 5 minutes on 2 CPU cores (4 repeats of each contender, one uncached run per float32 batch).

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from gptlab import generate
from gptlab.checkpoint import load_model, save_model
from gptlab.config import model_preset
from gptlab.inference import Engine, SamplingParams
from gptlab.kernels import largest_cache_bytes
from gptlab.quantize import Int8Linear, quantize_int8
from gptlab.model import GPT

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def read_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second that reducing a float32 tensor far larger than any cache reads, on all threads: the
    best of a sum and a maximum over several tries, since one busy moment reads low (a run at load 3 read
    16.8 GB/s where llama.cpp then moved 24.6; quiet, both reductions read 28-31)."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    return x.nbytes / min(timed(reduce)[0] for _ in range(repeats) for reduce in (x.sum, x.amax))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every matrix a decoding step reads in full: the linear layers' weights (the tied head once)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Int8Linear)):
            total += module.weight.nbytes + sum(
                getattr(module, name).nbytes for name in ("scales", "bias") if getattr(module, name, None) is not None)
    return total


def cache_bytes_per_step(model: GPT, batch: int, prompt: int, new: int, element_size: int) -> float:
    """The KV cache a step reads, averaged over the steps: 2 * L * B * S * C elements at S = its length."""
    c = model.config
    return 2 * c.n_layer * batch * (prompt + new / 2) * c.n_embd * element_size


def load_contenders(directory: Path, dtype: torch.dtype, with_int8: bool) -> dict[str, torch.nn.Module]:
    from transformers import GPT2LMHeadModel

    ours = load_model(directory).to(dtype).eval()
    theirs = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()
    theirs.generation_config.eos_token_id = None  # random weights: never stop before max_new_tokens
    theirs.generation_config.pad_token_id = 0
    models = {"gptlab": ours, "transformers": theirs}
    if with_int8:
        models["gptlab int8"] = quantize_int8(copy.deepcopy(ours))
    return models


def run(name: str, model: torch.nn.Module, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    if name == "transformers":
        with torch.inference_mode():
            return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                                  do_sample=False, use_cache=True)
    return generate(model, idx, new_tokens, temperature=0)


def measure(batch: int, dtype: torch.dtype, args: argparse.Namespace, directory: Path, bandwidth: float) -> dict:
    models = load_contenders(directory, dtype, with_int8=dtype == torch.float32 and not args.no_int8)
    ours = models["gptlab"]
    g = torch.Generator().manual_seed(batch)
    idx = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_tokens), generator=g)  # (B, T)
    n = args.new_tokens
    for name, model in models.items():  # warm-up: first calls allocate, and gptlab measures its kernels
        run(name, model, idx, 2)

    names = list(models)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    prefill: dict[str, list[float]] = {name: [] for name in names if name != "transformers"}
    outputs = {}
    for i in range(args.repeats):  # back to back, each going first in turn, so all meet the same load
        for name in names[i % len(names):] + names[: i % len(names)]:
            t, outputs[name] = timed(lambda: run(name, models[name], idx, n))
            seconds[name].append(t)
            if name in prefill:
                prefill[name].append(timed(lambda: run(name, models[name], idx, 1))[0])
    reference = outputs["transformers"]
    assert reference.shape == (batch, args.prompt_tokens + n), reference.shape

    row = dict(batch=batch, dtype=str(dtype).removeprefix("torch."), prompt_tokens=args.prompt_tokens,
               new_tokens=n, repeats=args.repeats, seconds=seconds, prefill_seconds=prefill,
               tok_s={name: batch * n / min(times) for name, times in seconds.items()},
               tokens_identical_to_transformers=bool(torch.equal(outputs["gptlab"], reference)),
               matching_token_fraction=float((outputs["gptlab"] == reference)[:, args.prompt_tokens:].float().mean()))
    rounds = sorted(h / c for h, c in zip(seconds["transformers"], seconds["gptlab"]))
    row["vs_transformers"] = row["tok_s"]["gptlab"] / row["tok_s"]["transformers"]
    row["vs_transformers_median_round"] = rounds[len(rounds) // 2]
    row["gb_per_s"] = {}
    for name in prefill:
        step = (min(seconds[name]) - min(prefill[name])) / (n - 1)  # one decoding step
        element = 4 if dtype == torch.float32 else 2  # the cache keeps the activations' dtype
        step_bytes = weight_bytes(models[name]) + cache_bytes_per_step(ours, batch, args.prompt_tokens, n, element)
        row["gb_per_s"][name] = step_bytes / step / 1e9
        row.setdefault("step_bytes", {})[name] = step_bytes
    row["bandwidth_fraction"] = {name: gbs * 1e9 / bandwidth for name, gbs in row["gb_per_s"].items()}
    if "gptlab int8" in models:
        row["int8_vs_float32"] = row["tok_s"]["gptlab int8"] / row["tok_s"]["gptlab"]
        same = outputs["gptlab int8"] == outputs["gptlab"]
        row["int8_matching_token_fraction"] = float(same[:, args.prompt_tokens:].float().mean())

    uncached = dict(tuple(map(int, spec.split(":"))) for spec in args.uncached)
    if batch in uncached and dtype == torch.float32:
        un = uncached[batch]
        t, plain = timed(lambda: generate(ours, idx, un, temperature=0, use_cache=False))
        with_cache = min(seconds["gptlab"]) if un == n else min(
            timed(lambda: generate(ours, idx, un, temperature=0))[0] for _ in range(args.repeats))
        row.update(uncached_new_tokens=un, uncached_tok_s=batch * un / t, cached_vs_uncached=t / with_cache,
                   uncached_tokens_identical=bool(torch.equal(plain, outputs["gptlab"][:, : args.prompt_tokens + un])))
    engine = Engine(ours, max_batch=batch, prefill_tokens=None)  # what generate() runs, stopped after its prefill
    for prompt in idx.tolist():
        engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False))
    engine.step()
    c, cache_bytes = ours.config, engine.cache.nbytes()
    formula = 2 * c.n_layer * batch * (args.prompt_tokens + n) * c.n_embd * engine.cache.kv.element_size()
    row.update(cache_bytes=cache_bytes, cache_formula_bytes=formula, cache_vs_formula=cache_bytes / formula)
    return row


def markdown(report: dict) -> str:
    in_cache = report["weights_fit_in_cache"]
    cache = (f"{report['last_level_cache_mb']:.0f} MB, " + (f"which holds the {' and '.join(in_cache)} weights. "
             if in_cache else "so no model here fits in cache. ")) if report["last_level_cache_mb"] else "unknown. "
    lines = [
        f"Machine: {report['machine']}; {report['threads']} threads; load average "
        f"{report['load_before']} before, {report['load_after']} after. Read bandwidth (sum of a "
        f"{report['bandwidth_probe_mb']} MB float32 tensor): {report['read_gb_s']:.1f} GB/s; largest CPU cache "
        f"{cache}"
        f"Model: GPT-2 124M shape, random weights; prompts of {report['prompt_tokens']} tokens; "
        f"{report['rows'][0]['new_tokens']} greedy tokens; gptlab {report['gptlab_weight_mb']}.",
        "",
        "| batch | weights | gptlab tok/s | transformers tok/s | gptlab / transformers (best runs) | (median round) "
        "| same tokens as transformers | gptlab GB/s (of the machine's) | gptlab int8 tok/s | int8 / float32 "
        "| int8 GB/s (of the machine's) | int8 tokens = float32's |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        same = "yes" if r["tokens_identical_to_transformers"] else f"no ({r['matching_token_fraction']:.0%} match)"
        gbs = f"{r['gb_per_s']['gptlab']:.1f} ({r['bandwidth_fraction']['gptlab']:.0%})"
        int8 = ["-"] * 4
        if "int8_vs_float32" in r:
            int8 = [f"{r['tok_s']['gptlab int8']:.1f}", f"{r['int8_vs_float32']:.2f}x",
                    f"{r['gb_per_s']['gptlab int8']:.1f} ({r['bandwidth_fraction']['gptlab int8']:.0%})",
                    f"{r['int8_matching_token_fraction']:.0%}"]
        lines.append(
            f"| {r['batch']} | {r['dtype']} | {r['tok_s']['gptlab']:.1f} | {r['tok_s']['transformers']:.1f} "
            f"| {r['vs_transformers']:.2f}x | {r['vs_transformers_median_round']:.2f}x | {same} | {gbs} | "
            + " | ".join(int8) + " |"
        )
    uncached = [r for r in report["rows"] if "uncached_tok_s" in r]
    lines += [
        "",
        "tok/s = batch x new tokens / wall time of the whole `generate` call (prefill included), fastest of the "
        "repeats; \"median round\" is the median over rounds of transformers' time / gptlab's for runs back to "
        "back, the figure least sensitive to other work on the machine. GB/s = the bytes one decoding step reads "
        "(every linear weight once, the tied head once, and the KV cache at its mean length) over the time of one "
        "step (the whole call less a prefill-only call, over the new tokens but the first); in brackets, its share "
        "of the machine's read bandwidth.",
    ]
    if uncached:
        lines += ["", "Without the KV cache (float32): " + "; ".join(
            f"batch {r['batch']}: {r['uncached_tok_s']:.2f} tok/s over {r['uncached_new_tokens']} new tokens, the "
            f"cache {r['cached_vs_uncached']:.1f}x faster, same tokens: "
            f"{'yes' if r['uncached_tokens_identical'] else 'NO'}" for r in uncached) + "."]
    lines += ["", "KV cache memory (the engine's buffers after the prefill, over 2 * n_layer * B * T * n_embd * bytes, "
                  "T = prompt + new tokens): " + "; ".join(
                      f"batch {r['batch']} {r['dtype']}: {r['cache_vs_formula']:.3f}" for r in report["rows"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4, help="alternating runs per contender; the fastest counts")
    parser.add_argument("--uncached", nargs="*", default=["1:64", "8:16"], metavar="BATCH:NEW_TOKENS",
                        help="float32 batch sizes that also run without the cache, for how many new tokens (one run)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes, comma-separated")
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8 contender")
    parser.add_argument("--name", default="generate", help="results/NAME.json and results/NAME.md")
    args = parser.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    bandwidth = read_bandwidth()
    report = dict(machine=MACHINE, threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version(), prompt_tokens=args.prompt_tokens, load_before=load_before,
                  bandwidth_probe_mb=512, read_gb_s=bandwidth / 1e9, last_level_cache_mb=largest_cache_bytes() / 2**20,
                  rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        torch.manual_seed(0)
        model = GPT(model_preset("gpt2"))
        sizes = {label: weight_bytes(m) for label, m in
                 (("float32", model), ("bf16", copy.deepcopy(model).bfloat16()), ("int8", quantize_int8(copy.deepcopy(model))))}
        report["gptlab_weight_mb"] = ", ".join(f"{label} {n / 1e6:.0f} MB of weights" for label, n in sizes.items())
        report["weights_fit_in_cache"] = [label for label, n in sizes.items() if n <= largest_cache_bytes()]
        save_model(model, directory, require_hf=True)
        del model
        for dtype in args.dtypes.split(","):
            for batch in args.batches:
                row = measure(batch, getattr(torch, dtype), args, directory, bandwidth)
                print(json.dumps(row), flush=True)
                report["rows"].append(row)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    save_results(args.name, report, markdown(report))
    for r in report["rows"]:
        if r["dtype"] == "float32":
            assert r["tokens_identical_to_transformers"], f"batch {r['batch']}: gptlab and transformers disagree"
            assert r.get("uncached_tokens_identical", True), f"batch {r['batch']}: cached and uncached disagree"


if __name__ == "__main__":
    main()
