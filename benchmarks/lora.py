"""LoRA against full fine-tuning and against peft + transformers, on the GPT-2 medium shape (issue 22).

A GPT-2 medium (24 layers, 1024 wide, 355 M parameters) with random weights is saved once as transformers
saves it (no download). Each variant then runs in a fresh process of its own, so that its peak resident
memory (ru_maxrss: loading, the optimizer and the steps, all included) is its own:

- gptlab LoRA: what `gptlab train --init-from BASE --lora-rank 8` builds (train/setup.py build_model: the
  base frozen, rank 8, alpha 16, on c_attn, c_proj and c_fc of every block) and steps as the loop does
  (forward, backward, clip, fused AdamW over the adapters);
- gptlab full: the same without --lora-rank, every weight trained;
- peft + transformers: GPT2LMHeadModel.from_pretrained + peft.get_peft_model with the same LoRA (rank 8,
  alpha 16, the same layers, fan_in_fan_out for GPT-2's Conv1D), stepped the same way with torch's fused
  AdamW over its trainable parameters.

Each reports its trainable parameters, its optimizer state's bytes (every tensor in optimizer.state), its
peak RSS and the median time of a training step after the warm-up steps (gptlab measures its kernels
at their first use, and caches the choice). The variants run one after the
other, in rounds, so that a change of load on a shared machine falls on all of them; the step time is
the median over the rounds, the memory the largest. Each runs one torch thread by default (--threads): on
the shared 2-core machine two threads were starved by the other work (steps of 9 to 43 s for the same
variant), one thread is steadier. Targets: LoRA's peak memory at most half of full
fine-tuning's, and its step at least as fast as peft + transformers'.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/lora.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, n_positions=1024,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
RANK, ALPHA, TARGETS = 8, 16.0, ("c_attn", "c_proj", "c_fc")
VARIANTS = ("gptlab LoRA", "peft + transformers LoRA", "gptlab full fine-tuning")
BF16 = " (bf16 autocast)"
BF16_VARIANTS = ("gptlab LoRA" + BF16, "peft + transformers LoRA" + BF16)


def make_base(directory: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**MEDIUM)).save_pretrained(directory)


def gptlab_model(base: Path, lora: bool, seq: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from gptlab.train.config import build_train_config
    from gptlab.train.optim import configure_optimizer
    from gptlab.train.setup import build_model

    options = dict(init_from=str(base), block_size=seq, dropout=0.0, lr=1e-4, min_lr=1e-5)
    if lora:
        options.update(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=",".join(TARGETS))
    config = build_train_config(overrides=options)
    model = build_model(config, MEDIUM["vocab_size"], torch.device("cpu")).train()
    return model, configure_optimizer(model, config, torch.device("cpu"))


def peft_model(base: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import peft
    from transformers import GPT2LMHeadModel

    model = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(base), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), fan_in_fan_out=True, lora_dropout=0.0,
        task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1, fused=True)


def child(variant: str, base: Path, batch: int, seq: int, steps: int, warmup: int, threads: int) -> dict:
    """One variant in this (fresh) process: build, step, measure."""
    torch.set_num_threads(threads)
    bf16, kind = variant.endswith(BF16), variant.removesuffix(BF16)
    start = time.perf_counter()
    if kind == "peft + transformers LoRA":
        model, optimizer = peft_model(base)

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return model(input_ids=x, labels=x).loss
    else:
        model, optimizer = gptlab_model(base, lora=kind == "gptlab LoRA", seq=seq)

        def loss_of(x: torch.Tensor) -> torch.Tensor:  # the same next-token loss as transformers' labels=x
            return model(x[:, :-1], x[:, 1:]).loss
    load_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        x = torch.randint(0, MEDIUM["vocab_size"], (batch, seq + 1), generator=generator)
        x = x if kind != "peft + transformers LoRA" else x[:, :seq]  # seq positions in every variant
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as --dtype bfloat16 does
            loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    return {
        "variant": variant, "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": state_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_seconds": statistics.median(times[warmup:]), "first_step_seconds": times[0], "load_seconds": load_seconds,
        "loss": loss.item(), "threads": torch.get_num_threads(),
    }


def run_child(variant: str, base: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--base", str(base), "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    rows = results["variants"]
    full = rows["gptlab full fine-tuning"]
    theirs = rows["peft + transformers LoRA"]
    names = [name for name in (*VARIANTS, *BF16_VARIANTS) if name in rows]
    lines = [
        f"LoRA rank {RANK} (alpha {ALPHA:g}) on {', '.join(TARGETS)} of the GPT-2 medium shape (random weights, "
        f"{results['parameters']:,} parameters), {results['batch']} x {results['seq']} tokens a step, float32 weights "
        f"(the bf16 rows under bf16 autocast, as --dtype bfloat16), "
        f"{MACHINE}, {results['threads']} thread{'s' if results['threads'] > 1 else ''}, each variant a fresh "
        f"process, {results['rounds']} rounds; "
        f"load average {results['load_before']:.2f} before / {results['load_after']:.2f} after.",
        "",
        "| variant | trainable parameters | optimizer state | peak RSS | vs full fine-tuning | step (median) | "
        "vs peft + transformers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        row = rows[name]
        peer = rows["peft + transformers LoRA" + (BF16 if name.endswith(BF16) else "")]
        lines.append(
            f"| {name} | {row['trainable_parameters']:,} | {row['optimizer_state_bytes'] / 2**20:,.1f} MiB | "
            f"{row['peak_rss_bytes'] / 2**30:,.2f} GiB | {row['peak_rss_bytes'] / full['peak_rss_bytes']:.2f}x | "
            f"{row['step_seconds'] * 1000:,.0f} ms | {peer['step_seconds'] / row['step_seconds']:.2f}x |")
    lora = rows["gptlab LoRA"]
    memory, speed = lora["peak_rss_bytes"] / full["peak_rss_bytes"], theirs["step_seconds"] / lora["step_seconds"]
    targets = (f"Targets: peak memory at most half of full fine-tuning's: {memory:.2f}x "
               f"({'met' if memory <= 0.5 else 'NOT met'}); step at least as fast as peft + transformers: "
               f"{speed:.2f}x ({'met' if speed >= 1 else 'NOT met'})")
    if "gptlab LoRA" + BF16 in rows:
        bf16 = rows["peft + transformers LoRA" + BF16]["step_seconds"] / rows["gptlab LoRA" + BF16]["step_seconds"]
        targets += f", under bf16 autocast {bf16:.2f}x"
    per_round = "; ".join(f"{name} {', '.join(f'{s * 1000:,.0f}' for s in results['step_times'][name])} ms"
                          for name in names)
    lines += ["", f"{targets}. Step times per round: {per_round}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=VARIANTS + BF16_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also both LoRA variants under bf16 autocast (weights float32, as --dtype bfloat16)")
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help="windows a step")
    parser.add_argument("--seq", type=int, default=64, help="tokens a window")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each variant: on a shared 2-core machine one thread is steadier")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant and round, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed: the first ones measure kernels")
    parser.add_argument("--rounds", type=int, default=2, help="times each variant runs, interleaved")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.base, args.batch, args.seq, args.steps, args.warmup, args.threads)))
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gptlab-lora-bench-") as work:
        base = Path(work) / "gpt2-medium-random"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"from lora import make_base; from pathlib import Path; make_base(Path({str(base)!r}))"],
                       check=True, capture_output=True)
        chosen = VARIANTS + (BF16_VARIANTS if args.bf16 else ())
        runs: dict[str, list[dict]] = {name: [] for name in chosen}
        for _ in range(args.rounds):
            for name in chosen:
                runs[name].append(run_child(name, base, args))
                print(f"{name}: {runs[name][-1]['step_seconds'] * 1000:,.0f} ms a step, peak RSS "
                      f"{runs[name][-1]['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    variants = {}
    for name, rounds in runs.items():
        variants[name] = {**rounds[0], "step_seconds": statistics.median(r["step_seconds"] for r in rounds),
                          "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds)}
    results = {
        "machine": MACHINE, "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "rank": RANK, "alpha": ALPHA, "targets": list(TARGETS),
        "parameters": variants["gptlab full fine-tuning"]["trainable_parameters"],
        "threads": variants["gptlab LoRA"]["threads"],
        "load_before": load_before, "load_after": os.getloadavg()[0], "variants": variants,
        "step_times": {name: [r["step_seconds"] for r in rounds] for name, rounds in runs.items()},
    }
    save_results("lora", results, table(results))


if __name__ == "__main__":
    main()
