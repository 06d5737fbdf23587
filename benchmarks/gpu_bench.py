"""gptlab on a CUDA GPU, in one bounded run: the phases of benchmarks/gpu.sh.

Each phase runs in a process of its own under a wall-clock cap, so a crash, a CUDA error or a hang
in one costs that phase only: it records why and the next one runs. The whole run stops starting
phases once `--budget` seconds are spent (default 480). Sized for about 5 minutes on an H200, compiles
included: an estimate, since no GPU has run it yet.

    peak      the GPU's name and versions; the measured rate of a large bf16 matmul (random data) and
              gptlab's own probe, the figure `gptlab train` logs MFU against
    train     gptlab's training step as `gptlab train` takes it (gptlab.GPT, configure_optimizer's fused
              AdamW, the loop's autocast, clipping at 1.0) on the GPT-2 124M shape, bf16, torch.compile,
              a few hundred steps of random tokens already on the GPU: tokens/s and MFU
    train_hf  the same step for transformers' GPT2LMHeadModel: same shape, batch, dtype, optimizer, compile
    fp16      `gptlab train --dtype float16`, 124M shape, a few steps: finite losses, the grad scaler's scale
    resume    a tiny `gptlab train` run stopped halfway and resumed, against the same run uninterrupted
              and against a second uninterrupted run (how far two identical runs differ on this device:
              the resumed run passes as "within run-to-run noise" when it differs by at most twice that)
    generate  greedy bf16 decoding, 124M shape with random weights, batch 1 and 8: gptlab's `generate`
              against transformers' `generate` on the same GPU, tokens/s and whether the tokens match
    ddp       `gptlab train --nproc N` (torchrun's launcher, NCCL) when N >= 2 GPUs, against 1 process
              with the same global batch; skipped with the reason on one GPU
    loop      `gptlab train` itself on the 124M shape (bf16, compile, a prepared corpus read by memmap):
              the loop's own tokens/s against the bare step's

MFU is gptlab.throughput.flops_per_token at the measured tokens/s, over two peaks: the datasheet's
dense bf16 rate for the GPU named (989 TFLOP/s for an H100 SXM or H200), and the large matmul
measured here. Results: benchmarks/results/gpu.json and gpu.md (`--name`), every phase's output in
gpu.log beside them (not committed); all three are copied into $OUT when that is set.

`--device cpu --tiny` runs every phase on a tiny shape in a minute or two on 2 cores
(tests/test_gpu_bench.py), so the script cannot rot while no GPU is lent; figures from it mean nothing.

torch, gptlab and transformers are imported inside the functions that use them: the driver imports the
standard library only until it has said which packages are missing, and each phase what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORE = ("torch", "numpy", "tiktoken", "safetensors")  # what `import gptlab` needs: without them nothing runs
NEEDED = (*CORE, "tqdm", "matplotlib", "transformers")  # ... and what its training and the side-by-side rows need
# Dense bf16 tensor-core rates from NVIDIA's datasheets (TFLOP/s, without sparsity), by device name.
DATASHEET_BF16 = (("H200 NVL", 835.0), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                  ("H100", 989.4), ("A100", 312.0))
PHASES = ("peak", "train", "train_hf", "fp16", "resume", "generate", "ddp", "loop")
CAPS = dict(peak=60, train=180, train_hf=180, fp16=90, resume=90, generate=120, ddp=150, loop=150)  # seconds


# --- shapes ---------------------------------------------------------------------------------------

def shapes(tiny: bool) -> dict[str, Any]:
    """Every size the phases use: GPT-2 124M and its BPE, or with --tiny a toy of characters."""
    if tiny:
        model = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
        return dict(model=model, vocab=64, tokenizer="char", batch=4, warmup_steps=1, steps=4, round_steps=2,
                    fp16_batch=4, fp16_steps=3, resume=dict(model, batch=4, steps=4),
                    ddp=dict(model, batch=2, steps=3), loop_batch=4, loop_steps=4, loop_log=1,
                    prompt=8, new_tokens=8, repeats=2, corpus_words=3000, matmul=512)
    model = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    return dict(model=model, vocab=50257, tokenizer="gpt2", batch=16, warmup_steps=3, steps=300, round_steps=50,
                fp16_batch=8, fp16_steps=20,
                resume=dict(n_layer=2, n_head=2, n_embd=128, block_size=128, batch=8, steps=40),
                ddp=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8, steps=30),
                loop_batch=16, loop_steps=80, loop_log=10, prompt=128, new_tokens=128, repeats=3,
                corpus_words=200_000, matmul=8192)


# --- helpers shared by the phases -------------------------------------------------------------------

def device_of(args: argparse.Namespace) -> torch.device:
    import torch

    return torch.device(args.device)


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_compile(args: argparse.Namespace) -> tuple[bool, str]:
    """(compile?, why not): compile by default on CUDA only; never where gptlab says it cannot work."""
    from gptlab.train.device import compile_unavailable

    wanted = args.compile if args.compile is not None else args.device.startswith("cuda")
    if not wanted:
        return False, "off (--no-compile, or a CPU run without --compile)"
    reason = compile_unavailable(device_of(args))
    return (not reason), reason


class GptlabFailed(RuntimeError):
    """A `gptlab` command exited non-zero; the message ends with the last line it wrote to stderr."""


class _LastLine:
    """A text stream that passes everything on to `stream` and remembers the last non-empty line."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        lines = [line for line in text.splitlines() if line.strip()]
        self.last = lines[-1] if lines else self.last
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def gptlab_cli(argv: list[str]) -> None:
    """One `gptlab` command in this process, as a user types it: the most stable surface there is."""
    from gptlab.cli import main

    print("$ gptlab " + " ".join(argv), flush=True)
    stderr = _LastLine(sys.stderr)
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    if code != 0:
        raise GptlabFailed(f"exit {code}: {stderr.last}")


def corpus(args: argparse.Namespace) -> Path:
    """A prepared corpus of pseudo-words (Zipf-distributed), made once per run by `gptlab prepare`."""
    import numpy as np

    from gptlab.fileio import atomic_write_text

    data = Path(args.work, "data")
    if (data / "meta.json").is_file():
        return data
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    words = ["".join(rng.choice(letters, size=rng.integers(1, 9))) for _ in range(5000)]
    size = shapes(args.tiny)
    picks = np.minimum(rng.zipf(1.3, size=size["corpus_words"]), len(words)) - 1
    text = " ".join(words[i] + ("\n" if i % 17 == 0 else "") for i in picks)
    source = Path(args.work, "corpus.txt")
    atomic_write_text(source, text)
    gptlab_cli(["prepare", str(source), "--tokenizer", size["tokenizer"], "--out", str(data)])
    return data


def train_argv(args: argparse.Namespace, out: Path, shape: dict, dtype: str, steps: int, *,
               log_interval: int = 1, compile_: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """`gptlab train` for one run of `shape` on the run's corpus: no sample, no progress bar, 2 eval batches."""
    return ["train", "--data", str(corpus(args)), "--out", str(out), "--overwrite", "--no-progress",
            "--device", args.device, "--dtype", dtype, "--compile" if compile_ else "--no-compile",
            "--n-layer", str(shape["n_layer"]), "--n-head", str(shape["n_head"]), "--n-embd", str(shape["n_embd"]),
            "--block-size", str(shape["block_size"]), "--batch-size", str(shape["batch"]),
            "--max-iters", str(steps), "--log-interval", str(log_interval), "--eval-interval", "0",
            "--eval-iters", "2", "--warmup-iters", "5", "--sample-tokens", "0", "--dropout", "0", *extra]


def logged(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in logged(run_dir) if "loss" in row}


def scaler_state(run_dir: Path) -> dict | None:
    """The GradScaler's state (scale, growth factor, ...) wherever the run's checkpoint files hold it."""
    import torch

    def find(obj: Any) -> dict | None:
        if isinstance(obj, dict):
            if "scale" in obj and "growth_factor" in obj:
                return obj
            for value in obj.values():
                found = find(value)
                if found is not None:
                    return found
        return None

    for path in sorted(run_dir.glob("*.pt")):
        found = find(torch.load(path, map_location="cpu", weights_only=True))
        if found is not None:
            return {k: float(v) if hasattr(v, "__float__") else v for k, v in found.items()}
    return None


def compare(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """How two loss traces differ: the same steps, bit-identical or not, the largest difference."""
    if sorted(a) != sorted(b):
        return dict(same_steps=False, identical=False, max_abs_diff=math.inf)
    diffs = [abs(a[s] - b[s]) for s in a]
    return dict(same_steps=True, identical=all(a[s] == b[s] for s in a), max_abs_diff=max(diffs, default=0.0))


# --- phases ---------------------------------------------------------------------------------------

def phase_peak(args: argparse.Namespace) -> dict:
    """The machine, and the two matmul peaks MFU is reported against."""
    import torch

    from gptlab import GPTConfig
    from gptlab.throughput import matmul_peak

    device, size = device_of(args), shapes(args.tiny)
    facts: dict[str, Any] = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                                 cpu_cores=os.cpu_count(), gpu_count=torch.cuda.device_count())
    for name in ("transformers", "tiktoken", "safetensors", "numpy", "triton"):
        try:
            facts[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            facts[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
            facts["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout else None
    else:
        facts["gpu"] = None
    n = size["matmul"]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)  # random data: zeros run faster
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    times = []
    for i in range(13):  # 3 warm-ups, then 10 timed products
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    # gptlab's probe times the model's own weight products at the training phases' batch
    probe = matmul_peak(device, torch.bfloat16, config=GPTConfig(vocab_size=size["vocab"], **size["model"]),
                        rows=size["batch"] * size["model"]["block_size"])
    facts.update(matmul_n=n, matmul_bf16_tflops=2 * n**3 / statistics.median(times) / 1e12,
                 matmul_bf16_tflops_best=2 * n**3 / min(times) / 1e12, gptlab_probe_bf16_tflops=probe / 1e12)
    return facts


def phase_train(args: argparse.Namespace, contender: str) -> dict:
    """gptlab's step, or the same step on transformers' model: warm-up (compile), then timed rounds."""
    import torch

    from gptlab import GPT, GPTConfig, TrainConfig
    from gptlab.train.optim import configure_optimizer
    from gptlab.throughput import flops_per_token
    from gptlab.train.device import autocast_context

    device, size = device_of(args), shapes(args.tiny)
    shape, B, T = size["model"], size["batch"], size["model"]["block_size"]
    config = GPTConfig(vocab_size=size["vocab"], dropout=0.0, **shape)
    torch.manual_seed(0)
    if contender == "gptlab":
        model = GPT(config).to(device)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2Config(vocab_size=size["vocab"], n_positions=T, n_embd=config.n_embd, n_layer=config.n_layer,
                        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(hf).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    compiled, why_not = use_compile(args)
    forward = torch.compile(model) if compiled else model
    if contender == "gptlab":
        def loss_of(x, y):
            return forward(x, y).loss
    else:
        def loss_of(x, y):  # GPT2LMHeadModel shifts the labels itself; no KV cache while training
            return forward(input_ids=x, labels=x, use_cache=False).loss
    optimizer = configure_optimizer(model, TrainConfig(lr=6e-4, weight_decay=0.1, beta2=0.95), device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):  # what gptlab's loop does per step, less the data loading and the logging
        with autocast_context(device, "bfloat16"):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, size["vocab"], (B, T + 1), device=device, generator=g) for _ in range(8)]
    batches = [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in batches]
    start = time.perf_counter()
    first = [step(*batches[i % 8]) for i in range(size["warmup_steps"])]
    synchronize(device)
    warmup_s = time.perf_counter() - start
    deadline = time.perf_counter() + (args.phase_deadline - time.time()) - 15  # leave time to report
    rounds, trace, done, last_round = [], [], 0, 0.0
    while done < size["steps"] and time.perf_counter() + last_round < deadline:  # until the steps or the time end
        n = min(size["round_steps"], size["steps"] - done)
        synchronize(device)
        start = time.perf_counter()
        trace += [step(*batches[(done + i) % 8]) for i in range(n)]
        synchronize(device)
        last_round = time.perf_counter() - start
        rounds.append(last_round / n)
        done += n
    if not rounds:
        raise RuntimeError(f"compiling and {size['warmup_steps']} warm-up steps took {warmup_s:.0f} s: "
                           "no time was left for a timed round before the phase's cap")
    trace_values = [float(v) for v in torch.stack(first + trace).cpu()]
    seconds = statistics.median(rounds)
    return dict(contender=contender, parameters=parameters, batch=B, block_size=T, dtype="bfloat16",
                compiled=compiled, compile_note=why_not, warmup_steps=size["warmup_steps"], warmup_s=warmup_s,
                steps=done, round_ms=[r * 1e3 for r in rounds], ms_per_step=seconds * 1e3,
                tokens_per_s=B * T / seconds, flops_per_token=flops_per_token(config, T),
                first_loss=trace_values[0], last_loss=trace_values[-1],
                finite=all(math.isfinite(v) for v in trace_values),
                max_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def phase_fp16(args: argparse.Namespace) -> dict:
    size = shapes(args.tiny)
    shape = dict(size["model"], batch=size["fp16_batch"])
    run = Path(args.work, "fp16")
    argv = train_argv(args, run, shape, "float16", size["fp16_steps"])
    try:
        gptlab_cli(argv)
    except GptlabFailed as exc:
        if args.device == "cpu":  # gptlab's float16 needs CUDA's grad scaler: its refusal is the result
            return dict(status="skipped", reason=f"on a CPU, {exc}")
        raise
    trace = losses(run)
    skipped = [row["step"] for row in logged(run) if "skipped" in row]
    values = list(trace.values())
    return dict(steps=len(values), batch=shape["batch"], block_size=shape["block_size"], first_loss=values[0],
                last_loss=values[-1], finite=all(math.isfinite(v) for v in values), skipped_steps=skipped,
                scaler=scaler_state(run))


def phase_resume(args: argparse.Namespace) -> dict:
    """Stop at half the steps, resume, and compare with two runs that never stopped."""
    shape = shapes(args.tiny)["resume"]
    steps, half = shape["steps"], shape["steps"] // 2
    extra = ("--lr-decay-iters", str(steps))  # the schedule of the whole run, also in its first half
    dtype = "bfloat16"
    runs = {name: Path(args.work, f"resume-{name}") for name in ("straight", "again", "resumed")}
    for name in ("straight", "again"):
        gptlab_cli(train_argv(args, runs[name], shape, dtype, steps, extra=extra))
    gptlab_cli(train_argv(args, runs["resumed"], shape, dtype, half, extra=extra))
    gptlab_cli(["train", "--resume", "--out", str(runs["resumed"]), "--max-iters", str(steps), "--no-progress"])
    straight, again, resumed = (losses(runs[n]) for n in ("straight", "again", "resumed"))
    result = compare(resumed, straight)
    repeat = compare(again, straight)
    if result["identical"]:
        verdict = "bit-identical"
    elif result["same_steps"] and 0 < repeat["max_abs_diff"] and result["max_abs_diff"] <= 2 * repeat["max_abs_diff"]:
        verdict = "within run-to-run noise"
    else:
        verdict = "differs beyond run-to-run noise"
    return dict(dtype=dtype, steps=steps, stopped_at=half, shape=shape, verdict=verdict, resumed_vs_straight=result,
                straight_vs_straight=repeat, last_loss=straight.get(steps))


def phase_generate(args: argparse.Namespace) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    from gptlab import GPT, GPTConfig, generate, load_model, save_model

    device, size = device_of(args), shapes(args.tiny)
    dtype = torch.bfloat16
    directory = Path(args.work, "generate-model")
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=size["vocab"], **size["model"])), directory, require_hf=True)
    ours = load_model(directory).to(device=device, dtype=dtype).eval()
    theirs = GPT2LMHeadModel.from_pretrained(directory).to(device=device, dtype=dtype).eval()
    theirs.generation_config.eos_token_id = None  # random weights: never stop before max_new_tokens
    theirs.generation_config.pad_token_id = 0

    def hf(idx: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                                   use_cache=True)

    contenders: dict[str, Callable] = dict(gptlab=lambda idx, n: generate(ours, idx, n, temperature=0), transformers=hf)
    rows = []
    P, n = size["prompt"], size["new_tokens"]
    for batch in (1, 8):
        g = torch.Generator(device=device).manual_seed(batch)
        idx = torch.randint(0, size["vocab"], (batch, P), device=device, generator=g)  # (B, P)
        for fn in contenders.values():
            fn(idx[:, :8], 2)  # warm-up: kernels, handles, caches
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        out: dict[str, torch.Tensor] = {}
        for r in range(size["repeats"]):  # taking turns to go first
            for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
                synchronize(device)
                start = time.perf_counter()
                out[name] = contenders[name](idx, n).cpu()
                seconds[name].append(time.perf_counter() - start)
        same = (out["gptlab"] == out["transformers"])[:, P:]
        first_diff = [int(row.logical_not().nonzero()[0]) if not row.all() else None for row in same]
        row = dict(batch=batch, prompt_tokens=P, new_tokens=n, seconds=seconds,
                   tokens_identical=bool(same.all()), matching_fraction=float(same.float().mean()),
                   first_mismatch=first_diff)
        for name in contenders:
            row[f"{name}_tok_s"] = batch * n / min(seconds[name])
        row["gptlab_vs_transformers"] = row["gptlab_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
    return dict(dtype="bfloat16", rows=rows)


def phase_ddp(args: argparse.Namespace) -> dict:
    """N processes against 1 with the same global batch: the same losses (to rounding), N times the tokens/s."""
    import torch

    if args.device == "cpu":
        nproc, backend = 2, "gloo"  # the CPU run exercises the same code path, 2 processes on gloo
    else:
        nproc, backend = torch.cuda.device_count(), "nccl"
        if nproc < 2:
            return dict(status="skipped", reason=f"{nproc} GPU on this machine: DDP needs 2 or more")
    shape = shapes(args.tiny)["ddp"]
    runs = {}
    for procs in (1, nproc):
        out = Path(args.work, f"ddp-{procs}")
        extra = ("--nproc", str(procs), "--grad-accum", str(nproc))
        gptlab_cli(train_argv(args, out, shape, "bfloat16", shape["steps"], extra=extra))
        rows = logged(out)
        rates = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row][1:]  # the first pays warm-up
        runs[procs] = dict(losses=losses(out), tokens_per_s=statistics.median(rates) if rates else None)
    trace = compare(runs[nproc]["losses"], runs[1]["losses"])
    one, many = runs[1]["tokens_per_s"], runs[nproc]["tokens_per_s"]
    return dict(processes=nproc, backend=backend, shape=shape, global_batch=shape["batch"] * nproc,
                losses_vs_one_process=trace, tokens_per_s_one=one, tokens_per_s_many=many,
                speedup=many / one if one and many else None)


def phase_loop(args: argparse.Namespace) -> dict:
    """The whole `gptlab train` loop: its own meter's tokens/s (evaluation and checkpoints excluded)."""
    from gptlab import load_model
    from gptlab.throughput import flops_per_token

    size = shapes(args.tiny)
    shape = dict(size["model"], batch=size["loop_batch"])
    compiled, why_not = use_compile(args)
    out = Path(args.work, "loop")
    start = time.perf_counter()
    gptlab_cli(train_argv(args, out, shape, "bfloat16", size["loop_steps"], log_interval=size["loop_log"],
                          compile_=compiled))
    rows = [row for row in logged(out) if "tokens_per_s" in row]
    rates = [row["tokens_per_s"] for row in rows[1:]] or [row["tokens_per_s"] for row in rows]  # first: warm-up
    config = load_model(out).config  # the vocabulary is the corpus's
    trace = list(losses(out).values())
    return dict(batch=shape["batch"], block_size=shape["block_size"], steps=size["loop_steps"], dtype="bfloat16",
                compiled=compiled, compile_note=why_not, wall_s=time.perf_counter() - start,
                tokens_per_s=statistics.median(rates), logged_mfu=[row.get("mfu") for row in rows],
                flops_per_token=flops_per_token(config, shape["block_size"]), first_loss=trace[0],
                last_loss=trace[-1])


RUNNERS: dict[str, Callable[[argparse.Namespace], dict]] = dict(
    peak=phase_peak, train=lambda a: phase_train(a, "gptlab"), train_hf=lambda a: phase_train(a, "transformers"),
    fp16=phase_fp16, resume=phase_resume, generate=phase_generate, ddp=phase_ddp, loop=phase_loop,
)


# --- the driver -----------------------------------------------------------------------------------

def run_phase(name: str, args: argparse.Namespace, cap: float, log) -> dict:
    """`name` in a process of its own, killed (with anything it started) after `cap` seconds."""
    result_path = Path(args.work, f"{name}.json")
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--device", args.device,
               "--work", args.work, "--phase-deadline", str(time.time() + cap)]
    command += ["--tiny"] if args.tiny else []
    command += [] if args.compile is None else ["--compile" if args.compile else "--no-compile"]
    log.write(f"\n===== phase {name} (cap {cap:.0f} s) =====\n")
    log.flush()
    start = time.perf_counter()
    env = dict(os.environ)
    if args.tiny:  # tiny tensors: one thread each, rather than OpenMP threads stalling each other on a busy CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        code = process.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the phase and every process it started
        process.wait()
        code = None
    seconds = time.perf_counter() - start
    if code is None:
        return dict(status="failed", reason=f"stopped at its cap of {cap:.0f} s", seconds=seconds)
    if code != 0 or not result_path.is_file():
        return dict(status="failed", reason=f"exit {code}: {last_error(args.log_path)}", seconds=seconds)
    result = json.loads(result_path.read_text())
    result.setdefault("status", "ok")
    result["seconds"] = seconds
    return result


def last_error(log_path: Path) -> str:
    """The last non-empty line the failed phase printed (a traceback's last line names the error)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def datasheet_peak(gpu: str | None) -> tuple[float | None, str]:
    for key, tflops in DATASHEET_BF16:
        if gpu and key in gpu:
            return tflops, f"NVIDIA's datasheet, dense bf16, {key}"
    return None, "no datasheet figure for this device"


def derive(results: dict) -> None:
    """MFU against both peaks and the gptlab/transformers ratio, from what the phases measured."""
    phases = results["phases"]
    peak = phases.get("peak", {})
    datasheet, source = datasheet_peak(peak.get("gpu"))
    measured = peak.get("matmul_bf16_tflops")
    results["peaks"] = dict(datasheet_bf16_tflops=datasheet, datasheet_source=source, measured_bf16_tflops=measured,
                            gptlab_probe_bf16_tflops=peak.get("gptlab_probe_bf16_tflops"))
    for name in ("train", "train_hf", "loop"):
        row = phases.get(name, {})
        if row.get("status") != "ok":
            continue
        flops = row["tokens_per_s"] * row["flops_per_token"] / 1e12  # TFLOP/s the model's matmuls need
        row["model_tflops"] = flops
        row["mfu_datasheet"] = flops / datasheet if datasheet else None
        row["mfu_measured"] = flops / measured if measured else None
    ours, theirs = phases.get("train", {}), phases.get("train_hf", {})
    if ours.get("status") == theirs.get("status") == "ok":
        results["gptlab_vs_transformers_train"] = ours["tokens_per_s"] / theirs["tokens_per_s"]


def outcome(row: dict) -> str:
    """What became of a phase that has no figures: not run, or its status and why."""
    return f"{row['status']}: {row.get('reason', '')}" if row else "not run"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(results: dict) -> str:
    m, p = results["phases"].get("peak", {}), results["peaks"]
    phases = results["phases"]
    if m.get("status") == "ok":
        gpu = "no GPU (CPU run)"
        if m.get("gpu"):
            gpu = f"{m['gpu']} ({m['gpu_count']} GPU, {m['gpu_memory_gib']} GiB, driver {m.get('driver')})"
        machine = (f"{gpu}, CUDA {m['cuda']}, torch {m['torch']}, transformers {m['transformers']}, "
                   f"triton {m['triton']}, Python {m['python']}, {m['cpu_cores']} CPU cores")
    else:
        machine = f"unknown (the peak phase: {outcome(m)})"
    lines = [f"# gptlab on a GPU (`benchmarks/gpu.sh`, {results['mode']})", "",
             f"Machine: {machine}; load average {results['load_before']} before, {results['load_after']} after. "
             f"{results['started']}, {results['seconds']:.0f} s in all.", ""]
    if p["measured_bf16_tflops"]:
        ds = f"{p['datasheet_bf16_tflops']:.0f} TFLOP/s ({p['datasheet_source']})" if p["datasheet_bf16_tflops"] \
            else p["datasheet_source"]
        lines += [f"Peaks: datasheet {ds}; measured {m['matmul_n']}^3 bf16 matmul {p['measured_bf16_tflops']:.1f} "
                  f"TFLOP/s (median of 10, random data); gptlab's own probe of the model's weight products at "
                  f"this batch (what `gptlab train` logs MFU against) {p['gptlab_probe_bf16_tflops']:.1f} TFLOP/s.", ""]
    train = phases.get("train", {})
    shape = results["shape"]
    lines += [f"## Training step: {shape['n_layer']} layers, {shape['n_embd']} wide, context {shape['block_size']}, "
              f"vocabulary {results['vocab']}, batch {results['batch']}, bf16 autocast", "",
              "| implementation | compiled | tokens/s | ms/step | MFU (datasheet) | MFU (measured matmul) "
              "| vs transformers | compile + warm-up s | loss first -> last |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    labels = dict(train="gptlab step", train_hf="transformers GPT2LMHeadModel step",
                  loop="`gptlab train` (whole loop, memmap data)")
    for name in ("train", "train_hf", "loop"):
        row = phases.get(name, {})
        if row.get("status") != "ok":
            lines.append(f"| {labels[name]} | {outcome(row)} | | | | | | | |")
            continue
        ratio = row["tokens_per_s"] / phases["train_hf"]["tokens_per_s"] \
            if phases.get("train_hf", {}).get("status") == "ok" else None
        ms = f"{row['ms_per_step']:.1f}" if "ms_per_step" in row else "-"
        warm = f"{row['warmup_s']:.1f}" if "warmup_s" in row else "-"
        loss = f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}"
        lines.append(f"| {labels[name]} | {'yes' if row['compiled'] else 'no'} | {row['tokens_per_s']:,.0f} "
                     f"| {ms} | {pct(row['mfu_datasheet'])} | {pct(row['mfu_measured'])} "
                     f"| {'-' if ratio is None else f'{ratio:.2f}x'} | {warm} | {loss} |")
    notes = []
    if train.get("status") == "ok":
        notes.append(f"gptlab's timed rounds took {', '.join(f'{r:.1f}' for r in train['round_ms'])} ms/step; each "
                     f"step row gives its median round, after warm-up steps ({train['warmup_steps']}) that compile.")
    loop = phases.get("loop", {})
    if loop.get("status") == "ok":
        notes.append(f"The loop's tokens/s is the median of what its own meter logged (evaluation and checkpoints "
                     f"excluded); its {loop['steps']} steps took {loop['wall_s']:.0f} s from start to exit (set-up, "
                     f"compile, evaluation, checkpoints and report included).")
    lines += ["", " ".join(notes)] if notes else []
    gen = phases.get("generate", {})
    lines += ["", "## Generation: greedy, bf16 weights, random weights of the same shape", ""]
    if gen.get("status") == "ok":
        lines += ["| batch | prompt | new tokens | gptlab tok/s | transformers tok/s | gptlab / transformers "
                  "| same tokens |", "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in gen["rows"]:
            same = "yes" if r["tokens_identical"] else \
                f"no: {r['matching_fraction']:.0%} match, first mismatch at {r['first_mismatch']}"
            lines.append(f"| {r['batch']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['gptlab_tok_s']:,.1f} "
                         f"| {r['transformers_tok_s']:,.1f} | {r['gptlab_vs_transformers']:.2f}x | {same} |")
        lines += ["", "tok/s = batch x new tokens / the fastest call's wall time (prefill included)."]
    else:
        lines.append(outcome(gen))
    lines += ["", "## Checks", "", "| check | result |", "| --- | --- |"]
    for label, name, describe in (("fp16 with the grad scaler", "fp16", fp16_line), ("resume", "resume", resume_line),
                                  ("DDP", "ddp", ddp_line)):
        row = phases.get(name, {})
        lines.append(f"| {label} | {describe(row) if row.get('status') == 'ok' else outcome(row)} |")
    lines += ["", "## Phases", "", "| phase | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for name in results["plan"]:
        row = phases.get(name, {})
        lines.append(f"| {name} | {row.get('status', 'not run')} | {row.get('seconds', 0):.0f} "
                     f"| {row.get('reason', '')} |")
    return "\n".join(lines) + "\n"


def fp16_line(r: dict) -> str:
    scale = r["scaler"]["scale"] if r.get("scaler") else "not found in the checkpoint"
    return (f"{r['steps']} steps (batch {r['batch']}, context {r['block_size']}): loss {r['first_loss']:.3f} -> "
            f"{r['last_loss']:.3f}, {'all finite' if r['finite'] else 'NOT all finite'}; scale {scale}; "
            f"{len(r['skipped_steps'])} steps skipped by the scaler")


def resume_line(r: dict) -> str:
    a, b = r["resumed_vs_straight"], r["straight_vs_straight"]
    return (f"{r['dtype']}, stopped at step {r['stopped_at']} of {r['steps']} and resumed: **{r['verdict']}** "
            f"(largest loss difference from the uninterrupted run {a['max_abs_diff']:.2e}; between two "
            f"uninterrupted runs {b['max_abs_diff']:.2e})")


def ddp_line(r: dict) -> str:
    trace = r["losses_vs_one_process"]
    agree = "bit-identical to" if trace["identical"] else f"within {trace['max_abs_diff']:.2e} of"
    speed = f"{r['speedup']:.2f}x the tokens/s of 1 process" if r.get("speedup") else "tokens/s not logged"
    return (f"{r['processes']} processes ({r['backend']}), global batch {r['global_batch']}: losses {agree} "
            f"1 process; {speed}")


def out_dir() -> Path | None:
    """$OUT, where a lent device machine's runner collects what a command leaves, if it is set."""
    out = os.environ.get("OUT")
    return Path(out) if out and Path(out).is_dir() else None


def drive(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if set(missing) & set(CORE) or importlib.util.find_spec("gptlab") is None:
        print(f"gpu_bench: error: cannot import gptlab (missing: {', '.join(missing) or 'gptlab itself'}); run "
              f"with PYTHONPATH=src, as benchmarks/gpu.sh does, where torch, numpy, tiktoken and safetensors are "
              f"installed", file=sys.stderr)
        return 3
    if missing:
        print(f"missing packages: {', '.join(missing)}; the phases that import them will fail and say so", flush=True)
    from gptlab.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

    plan = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(plan) - set(PHASES))
    if unknown:
        print(f"gpu_bench: error: unknown phases {', '.join(unknown)}; known: {', '.join(PHASES)}", file=sys.stderr)
        return 2
    name = args.name or ("gpu-tiny" if args.tiny else "gpu")
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gptlab-gpu-"))
    args.work = str(work)
    args.log_path = (out_dir() or work) / f"{name}.log"  # $OUT's files come back even after a kill
    size = shapes(args.tiny)
    results: dict[str, Any] = dict(
        mode=f"{args.device}, {'tiny shape: figures mean nothing' if args.tiny else 'GPT-2 124M shape'}",
        started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), budget_s=args.budget, plan=plan,
        shape=size["model"], vocab=size["vocab"], batch=size["batch"], missing_packages=missing,
        load_before=[round(x, 2) for x in os.getloadavg()], phases={})
    try:
        with open(args.log_path, "a") as log:
            for phase in plan:
                left = args.budget - (time.perf_counter() - began)
                if left < 20:
                    row = dict(status="skipped", reason=f"the run's budget of {args.budget:.0f} s was spent",
                               seconds=0)
                else:
                    row = run_phase(phase, args, min(CAPS[phase], left), log)
                results["phases"][phase] = row
                note = f": {row['reason']}" if row.get("reason") else ""
                print(f"{phase}: {row['status']} in {row['seconds']:.0f} s{note}", flush=True)
        results["seconds"] = time.perf_counter() - began
        results["load_after"] = [round(x, 2) for x in os.getloadavg()]
        derive(results)
        table = markdown(results)
        atomic_write_json(results_dir / f"{name}.json", results)
        atomic_write_text(results_dir / f"{name}.md", table)
        atomic_write_bytes(results_dir / f"{name}.log", args.log_path.read_bytes())
        if out_dir() and out_dir() != results_dir:
            for suffix in (".json", ".md"):
                atomic_write_bytes(out_dir() / f"{name}{suffix}", (results_dir / f"{name}{suffix}").read_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table, flush=True)
    print(f"wrote {results_dir / name}.json, .md and .log (every phase's output)")
    return 1 if any(row["status"] == "failed" for row in results["phases"].values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and a few steps per phase (the test)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training phases (default: on CUDA only)")
    parser.add_argument("--budget", type=float, default=480, help="seconds after which no phase starts")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--results", default=str(HERE / "results"), help="where NAME.json, .md and .log go")
    parser.add_argument("--name", default="", help="results file name (default gpu, or gpu-tiny with --tiny)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # a child process: run one phase
    parser.add_argument("--phase-deadline", type=float, default=math.inf, help=argparse.SUPPRESS)  # time.time()
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.phase:
        return drive(args)
    from gptlab.fileio import atomic_write_json

    atomic_write_json(Path(args.work, f"{args.phase}.json"), RUNNERS[args.phase](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
