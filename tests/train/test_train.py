"""The training loop: exact resume after SIGINT/SIGTERM, checkpoints that survive SIGKILL mid-save,
non-finite losses, mixed precision, torch.compile's fallback, and the FLOPs behind MFU."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from helpers import child_env, needs_compile

from gptlab import kernels, precision
from gptlab.train import device as device_module
from gptlab.checkpoint import load_model
from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.throughput import flops_per_token, matmul_parameters, matmul_peak
from gptlab.train.optim import learning_rate
from gptlab.train import build_train_config, train
from gptlab.train import loop as loop_module
from gptlab.train.device import autocast_context, compile_unavailable, resolve_dtype
from gptlab.train.loop import Loop
from gptlab.train.state import load_checkpoint

# dropout on, so that resuming must restore torch's random state too; two micro-batches per step
RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2, dropout=0.1,
           max_iters=24, eval_interval=8, eval_iters=2, log_interval=1, warmup_iters=4, sample_tokens=0)
# A child `gptlab train` that sends itself a signal in the forward pass of its STOP_AT_CALL-th training
# micro-batch, i.e. in the middle of a step: deterministic, yet the real signal path.
SIGNAL_CHILD = r"""
import os, signal, sys
from gptlab.cli import main
from gptlab.model import GPT
calls, forward = [], GPT.forward
def patched(model, *args, **kwargs):
    if model.training:
        calls.append(None)
        if len(calls) == int(os.environ["STOP_AT_CALL"]):
            os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))
    return forward(model, *args, **kwargs)
GPT.forward = patched
sys.exit(main(sys.argv[1:]))
"""

# A child `gptlab train` that hangs in the middle of its second checkpoint, just before the rename
# that would put HANG_BEFORE in place, after touching HANG_MARKER; the test then SIGKILLs it.
HANG_CHILD = r"""
import os, sys, time
from gptlab.cli import main
target, marker, seen = os.environ["HANG_BEFORE"], os.environ["HANG_MARKER"], []
rename = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.abspath(dst) == target:
        seen.append(dst)
        if len(seen) == 2:
            open(marker, "w").close()
            time.sleep(600)
    return rename(src, dst, *args, **kwargs)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def config_for(data: Path, out: Path, **overrides):
    return build_train_config(overrides={**RUN, "data": str(data), "out": str(out), **overrides})


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trace(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from every step's metrics row; a repeated step would be a bug."""
    losses = [(row["step"], row["loss"]) for row in rows(run_dir) if "loss" in row]
    assert len({step for step, _ in losses}) == len(losses), "a step was logged twice"
    return dict(losses)


def evaluations(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["val_loss"] for row in rows(run_dir) if "val_loss" in row}


def cli_args(data: Path, out: Path) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out), "--no-progress"]
    for name, value in RUN.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def reference(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run never interrupted, against which every resumed run is compared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference") / "run"
        train(config_for(char_data, out), show_progress=False)
    finally:
        torch.set_num_threads(before)
    return out


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Every step's loss and every evaluation bit-identical, and the final weights equal."""
    assert trace(resumed) == trace(reference)
    assert evaluations(resumed) == evaluations(reference)
    final, expected = load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in expected)


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_and_resume_is_bit_identical(
    signame: str, char_data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stop_by_signal(char_data, out, signame)
    result = train(config_for(char_data, out), resume=True, show_progress=False)
    assert result.step == RUN["max_iters"] and not result.stopped_by
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_muon_run_resumes_bit_identically(char_data: Path, tmp_path: Path) -> None:
    """Muon's momentum and AdamW's moments both travel through the checkpoint."""
    reference = tmp_path / "reference"
    train(config_for(char_data, reference, optimizer="muon"), show_progress=False)
    out = tmp_path / "run"
    stop_by_signal(char_data, out, "SIGTERM", "--optimizer", "muon")
    train(config_for(char_data, out, optimizer="muon"), resume=True, show_progress=False)
    assert_same_run(out, reference)


def stop_by_signal(data: Path, out: Path, signame: str, *options: str) -> None:
    """Run `gptlab train` in a child that signals itself mid-step 11, and check the checkpoint it wrote."""
    stop_at = 11  # between the evaluations at steps 8 and 16
    child = subprocess.run(
        [sys.executable, "-c", SIGNAL_CHILD, *cli_args(data, out), *options],
        env=child_env(STOP_AT_CALL=str(2 * stop_at - 1), STOP_SIGNAL=signame),  # 2 micro-batches a step
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 128 + getattr(signal, signame), child.stderr
    assert f"{signame} at step {stop_at}: checkpoint written" in child.stderr
    assert "Traceback" not in child.stderr
    assert load_checkpoint(out)["step"] == stop_at
    assert max(trace(out)) == stop_at


@pytest.mark.slow
@pytest.mark.parametrize("hang_before", ["training_state.pt", "model.safetensors"])
def test_sigkill_during_a_save_keeps_a_good_checkpoint(
    hang_before: str, char_data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    marker = tmp_path / "hanging"
    child = subprocess.Popen(
        [sys.executable, "-c", HANG_CHILD, *cli_args(char_data, out)],
        env=child_env(HANG_BEFORE=str((out / hang_before).resolve()), HANG_MARKER=str(marker)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the child never reached its second checkpoint"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    # killed in the checkpoint of step 16: the new state is either not in place yet, or complete
    assert list(out.glob(".*.tmp")), "the kill should have left the half-finished write behind"
    expected_step = 8 if hang_before == "training_state.pt" else 16
    assert load_checkpoint(out)["step"] == expected_step
    assert load_model(out).config.n_layer == RUN["n_layer"]  # the Hugging Face files still load

    result = train(config_for(char_data, out), resume=True, show_progress=False)
    assert result.step == RUN["max_iters"]
    assert not list(out.glob(".*.tmp"))
    assert_same_run(out, reference)


@pytest.mark.slow
def test_resume_of_a_finished_run_continues_to_a_new_max_iters(char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config_for(char_data, out, max_iters=8, dropout=0.0), show_progress=False)
    result = train(config_for(char_data, out, max_iters=12), resume=True, show_progress=False)
    assert result.step == 12
    assert sorted(trace(out)) == list(range(1, 13))
    assert json.loads((out / "train_config.json").read_text())["dropout"] == 0.0  # the saved options rule


def poisoned_forward(at: int):
    """GPT.forward, except that its training loss is NaN on the `at`-th training call."""
    forward, calls = GPT.forward, []

    def patched(model: GPT, *args, **kwargs):
        output = forward(model, *args, **kwargs)
        if model.training and output.loss is not None:
            calls.append(None)
            if len(calls) == at:
                output.loss = output.loss * math.nan
        return output

    return patched


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    # micro-batch 25 belongs to step 13 (two per step): after the checkpoint of step 8
    monkeypatch.setattr(GPT, "forward", poisoned_forward(at=25))
    with pytest.raises(GptlabError, match=r"training loss is nan at step 13.*last good checkpoint \(step 8\)"):
        train(config_for(char_data, out), show_progress=False)
    state = load_checkpoint(out)
    assert state["step"] == 8
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert max(trace(out)) == 12


@pytest.mark.slow
def test_nonfinite_loss_can_skip_the_step_instead(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(GPT, "forward", poisoned_forward(at=25))
    result = train(config_for(char_data, out, on_nonfinite="skip"), show_progress=False)
    assert result.step == RUN["max_iters"] and math.isfinite(result.val_loss)
    skipped = [row for row in rows(out) if "skipped" in row]
    assert [(row["step"], row["skipped"]) for row in skipped] == [(13, "the training loss is nan")]
    assert all(torch.isfinite(p).all() for p in load_model(out).parameters())


def test_metrics_report_tokens_per_second_and_mfu(reference: Path) -> None:
    logged = [row for row in rows(reference) if "loss" in row]
    assert "tokens_per_s" not in logged[0]  # the first step is warm-up, not measured
    measured = logged[1:]
    assert all(row["tokens_per_s"] > 0 and 0 < row["mfu"] < 10 for row in measured)
    # MFU is the model's FLOP rate over the probed peak: the two figures must agree with each other
    flops = flops_per_token(load_model(reference).config)
    ratios = [row["mfu"] / (row["tokens_per_s"] * flops) for row in measured]
    assert max(ratios) / min(ratios) < 1.01


@pytest.mark.parametrize("T", [16, 32])
def test_flops_formula_matches_torch_flop_counter(T: int) -> None:
    """6 N_matmul + 12 L T C per token is what torch counts for a real forward + backward step."""
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(config) == linear  # the tied head counted once, as a matmul
    x = torch.randint(0, 50, (3, T))
    # the textbook path: torch's counter sees its matmuls, not inside the fused kernel
    with kernels.force(attention="textbook"), FlopCounterMode(display=False) as counter:
        model(x, x).loss.backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(config, T) * 3 * T, rel=1e-12)


@pytest.mark.slow
def test_matmul_probe_measures_a_positive_rate() -> None:
    assert math.isfinite(peak := matmul_peak("cpu", torch.float32, seconds=0.02)) and peak > 0


def test_bfloat16_autocast_trains_float32_weights(char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(config_for(char_data, out, dtype="bfloat16", max_iters=3, dropout=0.0, eval_interval=0),
                   show_progress=False)
    assert math.isfinite(result.val_loss)
    assert all(p.dtype == torch.float32 for p in load_model(out).parameters())
    assert load_checkpoint(out)["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32


def test_float16_needs_cuda_and_says_so(char_data: Path, tmp_path: Path) -> None:
    with pytest.raises(GptlabError, match="float16 needs a CUDA device"):
        autocast_context(torch.device("cpu"), "float16")
    with pytest.raises(GptlabError, match="float16 needs a CUDA device"):
        train(config_for(char_data, tmp_path / "run", dtype="float16"), show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_compile_without_a_compiler_falls_back_to_eager_with_a_message(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(device_module.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in compile_unavailable(torch.device("cpu"))
    result = train(config_for(char_data, tmp_path / "run", compile=True, max_iters=2, eval_interval=0),
                   show_progress=False)
    assert result.step == 2
    assert "--compile: torch.compile needs a C++ compiler" in capsys.readouterr().err


@pytest.mark.slow
@needs_compile()
def test_a_compiled_run_trains_like_an_eager_one(char_data: Path, tmp_path: Path) -> None:
    """--compile changes the kernels (the GELU among them), not the numbers beyond rounding."""
    eager = trace(train(config_for(char_data, tmp_path / "eager", max_iters=4, eval_interval=0, dropout=0.0),
                        show_progress=False).run_dir)
    compiled = trace(train(config_for(char_data, tmp_path / "compiled", compile=True, max_iters=4, eval_interval=0,
                                      dropout=0.0),
                           show_progress=False).run_dir)
    assert list(compiled) == list(eager) == [1, 2, 3, 4]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-4)


def test_nproc_outside_torchrun_is_refused(char_data: Path, tmp_path: Path) -> None:
    with pytest.raises(GptlabError, match="gptlab train --nproc 2"):
        train(config_for(char_data, tmp_path / "run", nproc=2), show_progress=False)


@pytest.mark.parametrize("first_step", [0.0, 30.0], ids=["eager", "compiling"])
def test_decay_by_time_runs_the_warmup_and_the_decay_on_the_clock(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_step: float
) -> None:
    out = tmp_path / "run"
    # the first step takes `first_step` seconds (compiling), every later one 0.25 s
    monkeypatch.setattr(Loop, "elapsed", lambda self: first_step + 0.25 * self.state.step)
    config = config_for(char_data, out, max_iters=1000, max_time=first_step + 5.0, decay_by_time=True,
                        warmup_fraction=0.2, eval_interval=0, dropout=0.0)
    result = train(config, show_progress=False)
    assert result.step == 21  # the budget, not max_iters, ended the run: step 21 ended at 5.0 s of schedule
    # step k (from 0) reads the clock as it stood at the end of step k - 1, and the schedule's clock
    # starts when the first step ends: 0.25 * (k - 1) seconds of its 5 (none before step 1 has ended)
    position = [0.0 if k == 0 else min(1.0, 0.25 * (k - 1) / 5.0) * 1000 for k in range(21)]
    logged = [row["lr"] for row in rows(out) if "loss" in row]
    assert logged == pytest.approx([learning_rate(p, config) for p in position])
    assert logged.index(max(logged)) == 5  # the warm-up is a fifth of the time: 1 s, 4 steps after the first
    assert logged[-1] < config.min_lr + 0.01 * (config.lr - config.min_lr)  # decayed as the budget ends


@pytest.mark.slow
def test_a_slow_time_limited_run_warms_up_briefly_and_decays_smoothly(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo on a loaded machine: 120 steps in 4 minutes. Counted in steps, a 100-step warm-up
    took most of the budget and the decay then dropped the lr to its floor in one step."""
    out = tmp_path / "run"
    monkeypatch.setattr(Loop, "elapsed", lambda self: 2.0 * self.state.step)
    config = config_for(char_data, out, max_iters=100_000, max_time=240.0, decay_by_time=True,
                        warmup_iters=100, warmup_fraction=0.05, eval_interval=0, dropout=0.0, log_interval=1)
    train(config, show_progress=False)
    logged = [row["lr"] for row in rows(out) if "loss" in row]
    assert len(logged) == 121
    peak = logged.index(max(logged))
    assert 5 <= peak <= 8  # 5% of 240 s at 2 s a step
    assert all(b >= a for a, b in zip(logged[:peak], logged[1:peak + 1])) and logged[peak] > 10 * logged[0]
    assert max(a - b for a, b in zip(logged[peak:], logged[peak + 1:])) < 0.02 * config.lr  # no cliff


def test_decay_by_time_needs_a_time_budget() -> None:
    with pytest.raises(GptlabError, match="--decay-by-time needs --max-time"):
        build_train_config(overrides=dict(decay_by_time=True))


@pytest.mark.parametrize("bf16_rate, expected", [(4.1e11, "bfloat16"), (1.5e9, "float32")])
def test_dtype_auto_takes_bfloat16_only_where_its_matmuls_are_fast(
    monkeypatch: pytest.MonkeyPatch, bf16_rate: float, expected: str
) -> None:
    rates = {torch.float32: 2.0e11, torch.bfloat16: bf16_rate}  # an AVX-512-bf16 CPU, then an AVX2 one
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)  # what the rates say, on every CPU
    monkeypatch.setattr(device_module, "matmul_peak", lambda device, dtype, seconds, **shapes: rates[dtype])
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == "float32"  # an explicit choice is kept


def test_dtype_auto_is_recorded_as_the_dtype_it_chose(
    char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed = []

    def probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.25, **shapes: object) -> float:
        probed.append(shapes)
        return {torch.float32: 2.0e11, torch.bfloat16: 4.1e11}[dtype]  # an AVX-512-bf16 CPU

    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    monkeypatch.setattr(device_module, "matmul_peak", probe)  # for the dtype
    monkeypatch.setattr(loop_module, "matmul_peak", probe)  # for MFU
    out = tmp_path / "run"
    train(config_for(char_data, out, dtype="auto", max_iters=2, eval_interval=0), show_progress=False)
    assert json.loads((out / "train_config.json").read_text())["dtype"] == "bfloat16"
    # every probe ran the run's own model at one micro-batch (4 windows of 32 tokens)
    # (each dtype in precision.ROUNDS interleaved rounds, then the run's dtype for MFU)
    assert all(s["config"].n_embd == 32 and s["rows"] == 4 * 32 for s in probed)
    assert len(probed) == 2 * precision.ROUNDS + 1


def test_a_fine_tuned_run_records_the_pretrained_models_shape(tiny_run: Path, char_data: Path, tmp_path: Path) -> None:
    """The config is frozen: set-up puts what it learns (the shape, the data path) in a new one."""
    out = tmp_path / "run"
    config = config_for(char_data, out, init_from=str(tiny_run), n_layer=7, n_embd=64, max_iters=2, eval_interval=0)
    train(config, show_progress=False)
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["n_layer"], recorded["n_embd"], recorded["out"]) == (2, 32, str(out))
    assert recorded["data"] == str(char_data.resolve())
    assert (config.n_layer, config.n_embd, config.data) == (7, 64, str(char_data))  # the caller's is untouched


@pytest.mark.parametrize("task", ["text", "adder"])
def test_the_periodic_evaluation_is_the_training_loss_on_its_batches(task: str, char_data: Path) -> None:
    """The same mean as the model's loss: over the positions it takes (the adder: the answer digits only)."""
    import numpy as np

    from gptlab.train.adder import AdderDataset
    from gptlab.data import TokenDataset
    from gptlab.train.loop import estimate_loss

    dataset = AdderDataset() if task == "adder" else TokenDataset(char_data)
    config = build_train_config(overrides={"task": task, "block_size": 8, "batch_size": 4, "eval_iters": 1})
    torch.manual_seed(0)
    model = GPT(config.model_config(dataset.tokenizer.vocab_size)).eval()
    x, y = dataset.get_batch("val", 4, 8, np.random.default_rng([config.seed, 5, True]))
    with torch.no_grad():
        expected = model(x, y).loss.item()
    assert estimate_loss(model, dataset, config, torch.device("cpu"), step=5)["val"] == pytest.approx(expected, rel=1e-5)
