"""The GPT-2 124M recipe's code path on a tiny shape, activation checkpointing (equal gradients, lower
peak memory), TF32 on CUDA, and --adapt-threads' choice of the fastest thread count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from gptlab.train import TRAIN_PRESETS, build_train_config, train
from gptlab.train.device import enable_tf32
from gptlab.train.optim import learning_rate
from gptlab.train.setup import checkpoint_activations
from gptlab.threads import EXPLOIT_STEPS, EXPLORE_STEPS, ThreadTuner

# GPT-2 124M's recipe with everything but its size: 2 layers of 32, context 32, 2 windows a micro-batch
TINY_124M = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=2, grad_accum=4, max_iters=4,
                 eval_interval=2, eval_iters=1, sample_tokens=0, log_interval=1)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_gpt2_124m_recipe_is_the_published_one() -> None:
    recipe = TRAIN_PRESETS["gpt2-124m"]
    assert (recipe["n_layer"], recipe["n_head"], recipe["n_embd"], recipe["block_size"]) == (12, 12, 768, 1024)
    assert recipe["batch_size"] * recipe["grad_accum"] * recipe["block_size"] == 2**19  # ~0.5M tokens a step
    assert recipe["max_iters"] * 2**19 == pytest.approx(10e9, rel=1e-3)  # 10B tokens
    assert (recipe["lr"], recipe["min_lr"], recipe["warmup_iters"], recipe["schedule"]) == (6e-4, 6e-5, 715, "cosine")
    assert (recipe["beta1"], recipe["beta2"], recipe["weight_decay"], recipe["grad_clip"]) == (0.9, 0.95, 0.1, 1.0)
    assert (recipe["optimizer"], recipe["dtype"], recipe["compile"]) == ("adamw", "auto", True)


@pytest.mark.slow
def test_the_gpt2_124m_recipe_trains_on_a_tiny_shape(gpt2_data: Path, tmp_path: Path) -> None:
    """Its code path on a CPU: GPT-2 BPE data, gradient accumulation, AdamW (0.9, 0.95), warm-up and
    cosine, clipping, dtype auto. Not torch.compile: compiling costs a minute on a busy 2-core machine,
    and test_train.py's compiled run covers it."""
    out = tmp_path / "run"
    overrides = {**TINY_124M, "data": str(gpt2_data), "out": str(out), "compile": False}
    config = build_train_config("gpt2-124m", overrides=overrides)
    result = train(config, show_progress=False)
    assert result.step == 4 and result.tokens_seen == 4 * 2 * 4 * 32
    logged = [row for row in rows(out) if "loss" in row]
    assert [row["lr"] for row in logged] == pytest.approx([learning_rate(s, config) for s in range(4)])
    assert logged[0]["lr"] == pytest.approx(6e-4 / 716)  # the first of 715 warm-up steps
    assert all(row["grad_norm"] > 0 for row in logged)
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["beta2"], saved["weight_decay"], saved["grad_accum"], saved["preset"]) == (0.95, 0.1, 4, "gpt2-124m")
    assert saved["dtype"] in ("bfloat16", "float32")  # what auto chose here


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    plain, checkpointed = tiny_model(dropout=0.1).train(), tiny_model(dropout=0.1).train()
    checkpoint_activations(checkpointed)
    x = torch.randint(0, 50, (4, 16))
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # the same dropout masks: the recomputation replays torch's RNG
        model(x, x).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-7), name
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # checkpoint keys unchanged
    with torch.no_grad():  # evaluation runs the blocks as usual
        assert torch.equal(plain.eval()(x).logits, checkpointed.eval()(x).logits)


# One training step in a fresh process, which prints how far its resident memory rose above where it
# stood before the step (Linux's VmHWM, reset just before): the peak of the step's own allocations.
PEAK_CHILD = r"""
import sys, torch
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.train.setup import checkpoint_activations
torch.manual_seed(0)
torch.set_num_threads(1)
model = GPT(GPTConfig(vocab_size=64, block_size=128, n_layer=8, n_head=4, n_embd=64))
if sys.argv[1] == "checkpointed":
    checkpoint_activations(model)
x = torch.randint(0, 64, (8, 128))
model(x[:1, :8], x[:1, :8]).loss.backward()  # kernels chosen, buffers made, outside the measurement
model.zero_grad(set_to_none=False)
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
before = kib("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
model(x, x).loss.backward()
print(kib("VmHWM:") - before)
"""


@pytest.mark.slow
def test_activation_checkpointing_lowers_the_peak_memory_of_a_step() -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measuring a step's peak memory needs Linux's /proc/self/clear_refs")
    peaks = {}
    for variant in ("plain", "checkpointed"):
        done = subprocess.run([sys.executable, "-c", PEAK_CHILD, variant], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        peaks[variant] = int(done.stdout.split()[-1])  # KiB
    # 8 blocks of 1,024 tokens: each keeps ~15 C floats a token and its (T, T) attention weights, ~6 MB;
    # checkpointed, only its (B, T, C) input, 0.25 MB, plus one block's recomputation at a time (measured
    # here: 42-44 MB against 14-17 MB)
    assert peaks["checkpointed"] < 0.6 * peaks["plain"], peaks


def test_tf32_is_enabled_on_cuda_only() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        enable_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        enable_tf32(torch.device("cuda"))  # only sets torch's flags: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_adapt_threads_keeps_the_fastest_count_and_looks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = [2]  # torch's setting, as the tuner sees and changes it
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    said: list[str] = []
    tuner = ThreadTuner(True, said.append)
    ran: list[int] = []  # the thread count of each step
    seconds = {1: 1.0, 2: 3.5}  # a busy machine: one thread steps 3.5 times faster
    for _ in range(2 * EXPLORE_STEPS + EXPLOIT_STEPS):
        tuner.before_step()
        ran.append(threads[-1])
        tuner.after_step(seconds[threads[-1]])
    # a look interleaves the counts, starting with the one in use; then the faster one runs
    assert ran == [2, 1] * EXPLORE_STEPS + [1] * EXPLOIT_STEPS
    assert said == ["--adapt-threads: 1 thread(s) from now on (a step took 1 s at 1, 3.5 s at 2)"]
    seconds = {1: 1.0, 2: 0.6}  # the machine has gone quiet: the next look finds two faster
    for _ in range(2 * EXPLORE_STEPS + 1):
        tuner.before_step()
        tuner.after_step(seconds[threads[-1]])
    assert threads[-1] == 2 and said[-1].startswith("--adapt-threads: 2 thread(s)")


def test_adapt_threads_leaves_torch_alone_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tuner = ThreadTuner(False, print)
    tuner.before_step()
    tuner.after_step(1.0)
    assert calls == []


def test_the_amx_shakespeare_preset_changes_only_the_shape_and_the_weight_decay() -> None:
    """shakespeare-char-amx is shakespeare-char-cpu made wider and deeper (with the weight decay its
    larger model needed): every other setting, the budget included, stays the same."""
    cpu, amx = TRAIN_PRESETS["shakespeare-char-cpu"], TRAIN_PRESETS["shakespeare-char-amx"]
    changed = {name for name in {**cpu, **amx} if cpu.get(name) != amx.get(name)}
    assert changed == {"n_layer", "n_head", "n_embd", "weight_decay"}
    config = build_train_config("shakespeare-char-amx", overrides={"data": "unused"})
    assert (config.n_layer, config.n_embd, config.n_embd // config.n_head, config.max_time) == (4, 192, 32, 300.0)


def test_the_shakespeare_benchmark_takes_the_wide_preset_where_bf16_runs_4x() -> None:
    import importlib.util

    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(benchmarks))  # the script imports its neighbour machine.py
    try:
        spec = importlib.util.spec_from_file_location("shakespeare_bench", benchmarks / "shakespeare.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(benchmarks))
    assert bench.choose_preset(2.2) == "shakespeare-char-cpu"  # AVX-512-bf16 without AMX, as measured
    assert bench.choose_preset(3.99) == "shakespeare-char-cpu"
    assert bench.choose_preset(4.8) == "shakespeare-char-amx"  # the AMX Xeon, as measured
