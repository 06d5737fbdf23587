"""Data-parallel training: 2 CPU processes (gloo, under torchrun) compute what 1 process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab import distributed
from gptlab.cli import _train_argv, build_parser
from gptlab.config import build_train_config
from gptlab.distributed import Group
from gptlab.train import train

# dropout off: the 2 processes draw their own dropout masks, which 1 process cannot reproduce
RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2, dropout=0.0,
           max_iters=12, eval_interval=6, eval_iters=3, log_interval=1, warmup_iters=2, sample_tokens=0)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_share_gives_each_rank_its_own_contiguous_micro_batches() -> None:
    x = torch.arange(8).reshape(8, 1)
    pieces = [distributed.share(x, -x, Group(rank=r, world_size=2), micro_steps=2) for r in range(2)]
    got = [[xb.flatten().tolist() for xb, _ in piece] for piece in pieces]
    assert got == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    alone = distributed.share(x, -x, Group(), micro_steps=4)
    assert [xb.flatten().tolist() for xb, _ in alone] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(torch.equal(yb, -xb) for xb, yb in alone)


def test_train_argv_reproduces_the_command_line() -> None:
    argv = ["train", "--data", "d", "--out", "o", "--nproc", "2", "--lr", "0.003", "--no-bias", "--overwrite"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(_train_argv(args))
    assert vars(again) == vars(args)


def test_two_processes_match_one_process_with_the_same_global_batch(char_data: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes
    try:
        train(build_train_config(overrides={**RUN, "data": str(char_data), "out": str(single)}), show_progress=False)
    finally:
        torch.set_num_threads(threads)

    double = tmp_path / "double"
    argv = ["train", "--data", str(char_data), "--out", str(double), "--no-progress", "--nproc", "2"]
    for name, value in RUN.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    result = subprocess.run([sys.executable, "-m", "gptlab", *argv], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run ") == 1  # rank 0 alone reports

    one, two = rows(single), rows(double)
    assert [sorted(r) for r in one] == [sorted(r) for r in two]  # the same rows: rank 0 alone writes
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        for key in ("loss", "val_loss", "train_eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert json.loads((double / "train_config.json").read_text())["nproc"] == 2
    assert [r["step"] for r in two if "loss" in r] == list(range(1, 13))


def test_grad_accum_must_split_evenly_among_processes(char_data: Path, tmp_path: Path, capsys) -> None:
    from gptlab.cli import main

    code = main(["train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--nproc", "2",
                 "--grad-accum", "3"])
    assert code == 2
    assert "--grad-accum 3 must be a multiple of --nproc 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
