"""Data-parallel training: 2 CPU processes (gloo, under torchrun) compute what 1 process computes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.train import distributed
from gptlab.cli import _train_argv, build_parser, main
from gptlab.train.distributed import Group
from gptlab.train import build_train_config, saved_options, train
from gptlab.train.state import load_checkpoint

# dropout off: the 2 processes draw their own dropout masks, which 1 process cannot reproduce
RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2, dropout=0.0,
           max_iters=12, eval_interval=6, eval_iters=3, log_interval=1, warmup_iters=2, sample_tokens=0)

# Imported by every Python process started with this directory first on PYTHONPATH, torchrun's workers
# included: the worker of rank STOP_RANK sends itself SIGTERM in the forward pass of its
# STOP_AT_CALL-th training micro-batch, i.e. in the middle of a step, while the other rank goes on.
# Every worker also writes to DDP_COUNT_DIR/<rank> how many DDP wrappers are still alive when it
# tears its process group down.
SITECUSTOMIZE = r"""
import os
if os.environ.get("RANK") is not None and os.environ.get("DDP_COUNT_DIR"):
    import gc
    from pathlib import Path
    from torch.nn.parallel import DistributedDataParallel
    from gptlab.train import distributed
    teardown = distributed.teardown
    def counting_teardown(group):
        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        Path(os.environ["DDP_COUNT_DIR"], os.environ["RANK"]).write_text(str(alive))
        teardown(group)
    distributed.teardown = counting_teardown
if os.environ.get("RANK") == os.environ.get("STOP_RANK"):
    import signal
    from gptlab.model import GPT
    calls, forward = [], GPT.forward
    def patched(model, *args, **kwargs):
        if model.training:
            calls.append(None)
            if len(calls) == int(os.environ["STOP_AT_CALL"]):
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(model, *args, **kwargs)
    GPT.forward = patched
"""


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def gptlab_in_two_processes(
    char_data: Path, out: Path, env: dict | None = None, *options: str
) -> subprocess.CompletedProcess:
    argv = ["train", "--data", str(char_data), "--out", str(out), "--no-progress", "--nproc", "2", *options]
    for name, value in RUN.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    clean = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    return subprocess.run([sys.executable, "-m", "gptlab", *argv], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def assert_same_losses(run: Path, reference: Path) -> None:
    """The same rows, and every loss and evaluation within 1e-5 of the reference's."""
    ours, theirs = rows(run), rows(reference)
    kinds = [(r["step"], "loss" in r, "val_loss" in r) for r in theirs]
    assert [(r["step"], "loss" in r, "val_loss" in r) for r in ours] == kinds
    for a, b in zip(ours, theirs):
        for key in ("loss", "val_loss", "train_eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def train_in_one_process(char_data: Path, out: Path, **overrides) -> Path:
    """RUN in this process on one thread, as each of the 2 processes runs: the same global batch, its 2
    micro-batches in turn."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(build_train_config(overrides={**RUN, "data": str(char_data), "out": str(out), **overrides}),
              show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_process(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference for the 2-process runs."""
    return train_in_one_process(char_data, tmp_path_factory.mktemp("one") / "run")


def test_each_rank_reads_its_own_contiguous_rows_of_the_global_batch() -> None:
    rows = [distributed.rows_of(Group(rank=r, world_size=2), rows_per_process=4) for r in range(2)]
    assert [list(range(8))[r] for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(range(8))[distributed.rows_of(Group(), rows_per_process=8)] == list(range(8))  # alone: all


def test_train_argv_reproduces_the_command_line() -> None:
    argv = ["train", "--data", "d", "--out", "o", "--nproc", "2", "--lr", "0.003", "--no-bias", "--overwrite"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(_train_argv(args))
    assert vars(again) == vars(args)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(
    char_data: Path, one_process: Path, tmp_path: Path
) -> None:
    two = tmp_path / "two"
    result = gptlab_in_two_processes(char_data, two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run ") == 1  # rank 0 alone reports
    assert_same_losses(two, one_process)  # one row per step: rank 0 alone writes
    assert [r["step"] for r in rows(two) if "loss" in r] == list(range(1, RUN["max_iters"] + 1))
    assert json.loads((two / "train_config.json").read_text())["nproc"] == 2


@pytest.mark.slow
def test_muon_in_two_processes_matches_one_process(char_data: Path, tmp_path: Path) -> None:
    """Both processes orthogonalise the same all-reduced gradients, so they step as one process does."""
    one = train_in_one_process(char_data, tmp_path / "one", optimizer="muon")
    two = tmp_path / "two"
    result = gptlab_in_two_processes(char_data, two, None, "--optimizer", "muon")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(two, one)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step(
    char_data: Path, one_process: Path, tmp_path: Path
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "run"
    counts = tmp_path / "ddp-alive"
    counts.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
           "STOP_RANK": "1", "STOP_AT_CALL": "8", "DDP_COUNT_DIR": str(counts)}  # rank 1: one micro-batch a step
    result = gptlab_in_two_processes(char_data, out, env)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "SIGTERM at step 8: checkpoint written" in result.stderr
    # DDP sits in a reference cycle: it must be gone before the process group, not left to the
    # collector, which may reach it in interpreter shutdown, where gloo's teardown can abort the process
    assert {f.name: f.read_text() for f in counts.iterdir()} == {"0": "0", "1": "0"}
    assert load_checkpoint(out)["step"] == 8
    assert len(load_checkpoint(out)["process_rng"]) == 2  # both processes' random states

    # the run continues in one process: the same batches, so the same losses as the reference
    resumed = train(build_train_config(base=saved_options(out), overrides={"nproc": 1}), resume=True,
                    show_progress=False)
    assert resumed.step == RUN["max_iters"]
    assert_same_losses(out, one_process)


def test_grad_accum_must_split_evenly_among_processes(
    char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--nproc", "2",
                 "--grad-accum", "3"])
    assert code == 2
    assert "--grad-accum 3 must be a multiple of --nproc 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
