"""benchmarks/gpu_bench.py (run by benchmarks/gpu.sh on a GPU) keeps working while no GPU is lent.

The whole script runs on the CPU with a tiny shape: every phase must run, or be skipped for a reason
that holds on a CPU, and the results must say what each phase measured. Its figures mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here shares a module fixture that runs the benchmark script (35 s)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bench.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(results: Path, *args: str, timeout: int = 500) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    results = tmp_path_factory.mktemp("gpu-bench")
    done = run_bench(results, "--device", "cpu", "--tiny")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (json.loads((results / "gpu-tiny.json").read_text()), (results / "gpu-tiny.md").read_text(),
            (results / "gpu-tiny.log").read_text())


@pytest.mark.slow
def test_every_phase_runs_on_a_cpu_or_says_why_not(tiny_results: tuple[dict, str, str]) -> None:
    results, table, log = tiny_results
    phases = results["phases"]
    assert list(phases) == list(bench_module().PHASES)
    for name, row in phases.items():
        expected = "skipped" if name == "fp16" else "ok"  # gptlab's float16 needs CUDA's grad scaler
        assert row["status"] == expected, (name, row)
    assert "float16" in phases["fp16"]["reason"]
    assert "gptlab train: error: --dtype float16 needs a CUDA device" in log  # gptlab's own refusal, live
    for name in ("## Training step", "## Generation", "## Checks", "## Phases"):
        assert name in table


def test_the_training_rows_measure_both_implementations(tiny_results: tuple[dict, str, str]) -> None:
    phases = tiny_results[0]["phases"]
    ours, theirs, loop = phases["train"], phases["train_hf"], phases["loop"]
    assert ours["parameters"] == theirs["parameters"]  # the same network
    for row in (ours, theirs, loop):
        assert row["tokens_per_s"] > 0 and 0 < row["mfu_measured"]
        assert row["mfu_datasheet"] is None  # no datasheet peak for a CPU
    assert ours["finite"] and theirs["finite"]
    assert ours["steps"] == theirs["steps"] == 4
    assert tiny_results[0]["gptlab_vs_transformers_train"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])


def test_resume_ddp_and_generation_compare_what_they_claim(tiny_results: tuple[dict, str, str]) -> None:
    phases = tiny_results[0]["phases"]
    # on a CPU gptlab's resume is bit-identical (tests/test_train.py), so anything else is the script's fault
    assert phases["resume"]["verdict"] == "bit-identical"
    assert phases["resume"]["resumed_vs_straight"]["same_steps"]
    ddp = phases["ddp"]
    assert ddp["processes"] == 2 and ddp["backend"] == "gloo"
    assert ddp["losses_vs_one_process"]["same_steps"] and ddp["losses_vs_one_process"]["max_abs_diff"] < 1e-4
    rows = phases["generate"]["rows"]
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["gptlab_tok_s"] > 0 and r["transformers_tok_s"] > 0 and 0 <= r["matching_fraction"] <= 1


@pytest.mark.slow
def test_a_phase_that_fails_is_reported_and_the_next_one_runs(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: asking for it cannot fail here")
    done = run_bench(tmp_path, "--device", "cuda", "--tiny", "--phases", "peak,ddp", "--name", "broken")
    assert done.returncode == 1
    phases = json.loads((tmp_path / "broken.json").read_text())["phases"]
    assert phases["peak"]["status"] == "failed" and phases["peak"]["reason"].startswith("exit 1: ")
    assert phases["ddp"] == dict(phases["ddp"], status="skipped", reason="0 GPU on this machine: DDP needs 2 or more")
    assert "unknown (the peak phase: failed: exit 1" in (tmp_path / "broken.md").read_text()


def test_no_phase_starts_once_the_budget_is_spent(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--device", "cpu", "--tiny", "--budget", "0", "--name", "none")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "none.json").read_text())
    assert {row["status"] for row in results["phases"].values()} == {"skipped"}
    assert all("budget" in row["reason"] for row in results["phases"].values())


def test_the_scaler_state_is_found_in_a_checkpoint_file(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.save({"step": 3, "scaler": scaler.state_dict()}, tmp_path / "training_state.pt")
    state = bench_module().scaler_state(tmp_path)
    assert state["scale"] == 1024.0 and state["growth_factor"] == 2.0


def test_the_datasheet_peak_is_named_by_the_gpu() -> None:
    peak = bench_module().datasheet_peak
    assert peak("NVIDIA H200")[0] == peak("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert peak("NVIDIA H200 NVL")[0] == 835.0
    assert peak(None)[0] is None and peak("NVIDIA GeForce RTX 4090")[0] is None
