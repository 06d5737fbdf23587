"""Where a batch-1 decoding step's time goes: the products, attention, LayerNorm, GELU, sampling, the other
tensor operations, and what no operation accounts for (Python and dispatch).

GPT-2 124M shape, random weights, a 128-token prompt in the engine's cache, then `--steps` decoding steps
of `Engine.step` under torch.profiler: float32, bf16 (where the CPU has bf16 instructions) and
`--quantize int8`. Module hooks label every linear layer ("products": attention's,
the MLP's and the head's), LayerNorm,
the attention module less its two linear layers ("attention": split heads, the cache, SDPA, merge), the
MLP less its two linear layers ("GELU"), and the sampler call ("sampling"). "other operations" is the self
time of every other aten operation in the step (embedding, residual adds, the cache's bookkeeping); "Python
and dispatch" is the step's wall time that no operation accounts for. The profiler adds its own overhead
to every operation, so the step is also timed without it.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/decode_profile.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from gptlab.config import model_preset
from gptlab.inference import Engine, SamplingParams
from gptlab.model import GPT, MLP, CausalSelfAttention
from gptlab.kernels import chooser
from gptlab.quantize import Int8Linear, quantize_int8_where_faster

from machine import MACHINE, RESULTS, _cpu, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

PRODUCTS = ("products in attention", "products in the MLP", "products in the head")
LABELS = (*PRODUCTS, "LayerNorm", "attention module", "MLP module")


def label_of(name: str, module: torch.nn.Module) -> str | None:
    if isinstance(module, (torch.nn.Linear, Int8Linear)):
        return PRODUCTS[0] if ".attn." in name else PRODUCTS[1] if ".mlp." in name else PRODUCTS[2]
    if isinstance(module, torch.nn.LayerNorm):
        return "LayerNorm"
    if isinstance(module, CausalSelfAttention):
        return "attention module"
    return "MLP module" if isinstance(module, MLP) else None


def label_modules(model: torch.nn.Module) -> None:
    """Wrap each labelled module's forward in a profiler range of its label."""
    for name, module in model.named_modules():
        label = label_of(name, module)
        if label is None:
            continue
        ranges: list = []
        module.register_forward_pre_hook(lambda m, a, r=ranges, l=label: r.append(record_function(l).__enter__()))
        module.register_forward_hook(lambda m, a, o, r=ranges: r.pop().__exit__(None, None, None))


def decode_engine(model: GPT, prompt: list[int], new_tokens: int) -> Engine:
    engine = Engine(model, max_batch=1, prefill_tokens=None)
    engine.submit(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False))
    engine.step()  # the prefill
    return engine


def profile_steps(model: GPT, prompt: list[int], steps: int) -> dict:
    engine = decode_engine(model, prompt, 3 * steps + 2)
    for _ in range(steps):  # warm-up: the chooser measures each shape's kernels once
        engine.step()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    plain_ms = (time.perf_counter() - started) / steps * 1e3

    sampler = engine.sampler

    def labelled_sampler(*args, **kwargs):
        with record_function("sampling"):
            return sampler(*args, **kwargs)

    engine.sampler = labelled_sampler
    label_modules(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("step"):
                engine.step()
    totals = {e.key: e.cpu_time_total / steps / 1e3 for e in prof.key_averages()}  # ms per step, inclusive
    labels = {"step", "sampling", *LABELS}
    op_self_ms = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key not in labels) / steps / 1e3
    products = sum(totals.get(label, 0.0) for label in PRODUCTS)
    attention = totals.get("attention module", 0.0) - totals.get(PRODUCTS[0], 0.0)
    gelu = totals.get("MLP module", 0.0) - totals.get(PRODUCTS[1], 0.0)
    ln = totals.get("LayerNorm", 0.0)
    step = totals["step"]
    parts = {"products": products, "attention": attention, "LayerNorm": ln, "GELU": gelu,
             "sampling": totals.get("sampling", 0.0)}
    labelled_ops = sum(parts.values())
    parts["other operations"] = max(op_self_ms - labelled_ops, 0.0)
    parts["Python and dispatch"] = max(step - op_self_ms, 0.0)
    return dict(step_ms_without_profiler=plain_ms, step_ms_profiled=step, parts_ms=parts,
                top_ops=[(e.key, e.self_cpu_time_total / steps / 1e3) for e in
                         sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
                         if e.key not in labels][:8])


def previous_run(name: str) -> dict | None:
    """The last run's steps and load (results/NAME.json before this run replaces it), for a before/after."""
    try:
        last = json.loads((RESULTS / f"{name}.json").read_text())
        return dict(load_before=last["load_before"], steps_ms={
            weights: round(r["step_ms_without_profiler"], 1) for weights, r in last["rows"].items()},
            parts_ms={weights: {k: round(v, 2) for k, v in r["parts_ms"].items()} for weights, r in last["rows"].items()},
            top_ops={weights: r["top_ops"][:5] for weights, r in last["rows"].items()})
    except (OSError, ValueError, KeyError):
        return None


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; {report['threads']} threads; load average {report['load_before']} "
             f"before, {report['load_after']} after (shared machine). GPT-2 124M shape, random weights, batch 1, "
             f"a {report['prompt_tokens']}-token prompt cached, {report['steps']} decoding steps profiled.", "",
             "| weights | step (no profiler) | step (profiled) | products | attention | LayerNorm | GELU | sampling "
             "| other operations | Python and dispatch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["rows"].items():
        p = r["parts_ms"]
        lines.append(f"| {name} | {r['step_ms_without_profiler']:.1f} ms | {r['step_ms_profiled']:.1f} ms | "
                     + " | ".join(f"{p[k]:.2f} ms ({p[k] / r['step_ms_profiled']:.0%})" for k in
                                  ("products", "attention", "LayerNorm", "GELU", "sampling", "other operations",
                                   "Python and dispatch")) + " |")
    lines += ["", "Milliseconds per step, inclusive of the operations each part launches. Attention and GELU are "
                  "their modules' time less their own linear layers'. "
                  "Heaviest operations (self time per step): " + "; ".join(
                      f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["top_ops"][:5])
                      for name, r in report["rows"].items()) + "."]
    lines += [f"--quantize int8's whole-step check: {r['int8_verdict']}." for r in report["rows"].values()
              if r.get("int8_verdict")]
    before = report.get("previous")
    if before:
        lines += ["", f"The previous run (load average {before['load_before']}): step " + ", ".join(
            f"{weights} {ms} ms" for weights, ms in before["steps_ms"].items()) + "; heaviest operations " + "; ".join(
            f"{weights}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ops) for weights, ops in before["top_ops"].items())
            + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--name", default="decode_profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    torch.manual_seed(0)
    model = GPT(model_preset("gpt2")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,)).tolist()
    rows = {"float32": profile_steps(copy.deepcopy(model), prompt, args.steps)}
    flags = _cpu()[1]
    if "avx512_bf16" in flags or "amx_bf16" in flags:  # elsewhere torch emulates bf16: not a path to profile
        rows["bfloat16"] = profile_steps(copy.deepcopy(model).to(torch.bfloat16), prompt, args.steps)
    int8 = copy.deepcopy(model)
    kept = quantize_int8_where_faster(int8)  # what --quantize int8 runs: int8 only where a whole step is faster
    verdict = next((chooser.entry(k) for k in chooser._chosen if k[0] == "int8 decoding step"), None) or {}
    rows["int8 (--quantize int8)" if kept else "--quantize int8 (float weights kept)"] = {
        **profile_steps(int8, prompt, args.steps), "int8_verdict": verdict.get("reason", "")}
    report = dict(machine=MACHINE, threads=args.threads, prompt_tokens=args.prompt_tokens, steps=args.steps,
                  load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()], rows=rows,
                  previous=previous_run(args.name))
    save_results(args.name, report, markdown(report))


if __name__ == "__main__":
    main()
