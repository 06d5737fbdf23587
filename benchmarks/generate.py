"""Generation speed: gptlab with its KV cache, gptlab without, and transformers' `generate`, side by side.

One GPT-2 124M-shaped model with random weights is saved once in the Hugging Face format and loaded
both into gptlab and into `transformers.GPT2LMHeadModel`. Each configuration continues random
128-token prompts by 128 greedy tokens. Runs of the contenders alternate, and each reports its fastest
repeat: other work on the machine can only add time, so the minimum is the least disturbed figure.
The script asserts that gptlab (with and without cache) and transformers produce the same tokens.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from gptlab.checkpoint import load_model, save_model
from gptlab.config import model_preset
from gptlab.inference import Engine, SamplingParams, generate
from gptlab.model import GPT

from machine import MACHINE  # benchmarks/machine.py: a script's own folder is on sys.path
RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def load_both(directory: Path, dtype: torch.dtype) -> tuple[GPT, torch.nn.Module]:
    from transformers import GPT2LMHeadModel

    ours = load_model(directory).to(dtype).eval()
    theirs = GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()
    theirs.generation_config.eos_token_id = None  # random weights: never stop before max_new_tokens
    theirs.generation_config.pad_token_id = 0
    return ours, theirs


def hf_generate(model: torch.nn.Module, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                              do_sample=False, use_cache=True)


def measure(batch: int, dtype: torch.dtype, args: argparse.Namespace, directory: Path) -> dict:
    ours, theirs = load_both(directory, dtype)
    g = torch.Generator().manual_seed(batch)
    idx = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_tokens), generator=g)  # (B, T)
    n = args.new_tokens
    warm = idx[:, :8]
    generate(ours, warm, 2, temperature=0)
    hf_generate(theirs, warm, 2)

    cached_s, hf_s = [], []
    for i in range(args.repeats):  # back to back, taking turns to go first, so both meet the same load
        for contender in (("gptlab", "hf") if i % 2 == 0 else ("hf", "gptlab")):
            if contender == "gptlab":
                t, cached = timed(lambda: generate(ours, idx, n, temperature=0))
                cached_s.append(t)
            else:
                t, reference = timed(lambda: hf_generate(theirs, idx, n))
                hf_s.append(t)
    assert reference.shape == (batch, args.prompt_tokens + n), reference.shape
    round_ratios = sorted(h / c for h, c in zip(hf_s, cached_s))

    row = dict(batch=batch, dtype=str(dtype).removeprefix("torch."), prompt_tokens=args.prompt_tokens,
               new_tokens=n, repeats=args.repeats, cached_seconds=cached_s, transformers_seconds=hf_s,
               cached_tok_s=batch * n / min(cached_s), transformers_tok_s=batch * n / min(hf_s),
               tokens_identical_to_transformers=bool(torch.equal(cached, reference)),
               matching_token_fraction=float((cached == reference)[:, args.prompt_tokens:].float().mean()))
    row["cached_vs_transformers"] = row["cached_tok_s"] / row["transformers_tok_s"]
    row["cached_vs_transformers_per_round"] = round_ratios
    row["cached_vs_transformers_median_round"] = round_ratios[len(round_ratios) // 2]

    uncached = dict(tuple(map(int, spec.split(":"))) for spec in args.uncached)
    if batch in uncached:
        un = uncached[batch]
        t, uncached = timed(lambda: generate(ours, idx, un, temperature=0, use_cache=False))
        row.update(uncached_new_tokens=un, uncached_seconds=t, uncached_tok_s=batch * un / t,
                   uncached_tokens_identical=bool(torch.equal(uncached, cached[:, : args.prompt_tokens + un])))
        # the same number of new tokens with the cache, for a like-for-like ratio
        t_same = min(cached_s) if un == n else min(
            timed(lambda: generate(ours, idx, un, temperature=0))[0] for _ in range(args.repeats))
        row["cached_vs_uncached"] = t / t_same

    engine = Engine(ours, max_batch=batch, prefill_tokens=None)  # what generate() runs, stopped after its prefill
    for prompt in idx.tolist():
        engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False))
    engine.step()
    c, cache_bytes = ours.config, engine.cache.nbytes()
    formula = 2 * c.n_layer * batch * (args.prompt_tokens + n) * c.n_embd * engine.cache.kv.element_size()
    row.update(cache_bytes=cache_bytes, cache_formula_bytes=formula, cache_vs_formula=cache_bytes / formula)
    return row


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}; {report['threads']} threads; load average "
        f"{report['load_before']} before, {report['load_after']} after.",
        f"Model: GPT-2 124M shape, random weights; prompts of {report['prompt_tokens']} tokens; greedy.",
        "",
        "| batch | dtype | new tokens | gptlab + cache tok/s | gptlab no cache tok/s | transformers tok/s "
        "| cache / transformers (best runs) | (median round) | cache / no cache | same tokens as transformers "
        "| cache memory / formula |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        uncached = "-"
        if "uncached_tok_s" in r:
            uncached = f"{r['uncached_tok_s']:.2f}"
            if r["uncached_new_tokens"] != r["new_tokens"]:
                uncached += f" ({r['uncached_new_tokens']} new tokens)"
        ratio_un = f"{r['cached_vs_uncached']:.1f}x" if "cached_vs_uncached" in r else "-"
        same = "yes" if r["tokens_identical_to_transformers"] else f"no ({r['matching_token_fraction']:.0%} match)"
        lines.append(
            f"| {r['batch']} | {r['dtype']} | {r['new_tokens']} | {r['cached_tok_s']:.1f} | {uncached} "
            f"| {r['transformers_tok_s']:.1f} | {r['cached_vs_transformers']:.2f}x "
            f"| {r['cached_vs_transformers_median_round']:.2f}x | {ratio_un} | {same} "
            f"| {r['cache_vs_formula']:.3f} |"
        )
    lines += ["", "tok/s = batch x new tokens / wall time of the whole call (prefill included), fastest of the "
                  "repeats. \"median round\" is the median over rounds of transformers' time / gptlab's time for "
                  "two runs back to back, whichever went first alternating: the figure least sensitive to other "
                  "work on the machine.",
              "", "Cache memory is the bytes of the preallocated key and value buffers over "
                  "2 * n_layer * B * T * n_embd * bytes, T = prompt + new tokens (the last token is never fed "
                  "back, so the cache holds T - 1 positions). \"cache / no cache\" compares the same number of "
                  "new tokens."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4, help="alternating runs per contender; the fastest counts")
    parser.add_argument("--uncached", nargs="*", default=["1:128", "8:32"], metavar="BATCH:NEW_TOKENS",
                        help="batch sizes that also run without the cache, and for how many new tokens (one slow run)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated; bf16 is worth measuring only where the CPU has bf16 instructions")
    parser.add_argument("--name", default="generate", help="results/NAME.json and results/NAME.md")
    args = parser.parse_args()

    report = dict(machine=MACHINE, threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version(), prompt_tokens=args.prompt_tokens,
                  load_before=[round(x, 2) for x in os.getloadavg()], rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        torch.manual_seed(0)
        save_model(GPT(model_preset("gpt2")), directory, require_hf=True)
        for dtype in args.dtypes.split(","):
            # the uncached baseline is a float32 figure: bf16 rows compare with transformers only
            dtype_args = args if dtype == "float32" else argparse.Namespace(**{**vars(args), "uncached": []})
            for batch in args.batches:
                row = measure(batch, getattr(torch, dtype), dtype_args, directory)
                print(json.dumps(row), flush=True)
                report["rows"].append(row)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    for r in report["rows"]:
        if r["dtype"] == "float32":
            assert r["tokens_identical_to_transformers"], f"batch {r['batch']}: gptlab and transformers disagree"
            assert r.get("uncached_tokens_identical", True), f"batch {r['batch']}: cached and uncached disagree"


if __name__ == "__main__":
    main()
