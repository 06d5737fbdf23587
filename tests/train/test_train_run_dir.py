"""The run directory: `--overwrite` replaces a gptlab run and nothing else, only after every check of the
new run has passed; one process per run, even when two start together or one was SIGKILLed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_ARGS, child_env, one_line_error, snapshot, steps_logged

from gptlab.data import TokenDataset

# A child `gptlab train` that, in the forward pass of its HOLD_AT_CALL-th training step, touches
# HOLD_MARKER and sleeps: a run in progress, holding its directory, for as long as the test wants.
HOLDING_CHILD = r"""
import os, sys, time
from gptlab.cli import main
from gptlab.model import GPT
calls, forward = [], GPT.forward
def patched(model, *args, **kwargs):
    if model.training:
        calls.append(None)
        if len(calls) == int(os.environ["HOLD_AT_CALL"]):
            open(os.environ["HOLD_MARKER"], "w").close()
            time.sleep(600)
    return forward(model, *args, **kwargs)
GPT.forward = patched
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def old_run(char_data: Path, tmp_path: Path, gptlab) -> Path:
    out = tmp_path / "old"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS, "--max-iters=2")
    assert code == 0, err
    return out


def test_overwrite_refuses_the_current_directory_holding_a_thesis(
    char_data: Path, tmp_path: Path, gptlab, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "thesis.tex").write_text("\\chapter{Four years of work}\n")
    (home / "src" / "main.py").write_text("print('hello')\n")
    monkeypatch.chdir(home)
    before = snapshot(home)
    code, _, err = gptlab("train", "--data", str(char_data), "--out", ".", "--overwrite", "--no-progress", *TINY_ARGS)
    one_line_error(code, err, 2, "is not a gptlab run", "thesis.tex", "--overwrite replaces only a gptlab run")
    assert snapshot(home) == before


def test_overwrite_refuses_a_dataset(char_data: Path, tmp_path: Path, gptlab) -> None:
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    before = snapshot(data)
    code, _, err = gptlab("train", "--data", str(data), "--out", str(data), "--overwrite", "--no-progress", *TINY_ARGS)
    one_line_error(code, err, 2, "is not a gptlab run", "meta.json")
    assert snapshot(data) == before
    TokenDataset(data).check_length("train", 8)  # still a dataset


@pytest.mark.parametrize("bad, fragment", [
    (["--data", "{tmp}/mistyped"], "does not exist"),  # the data does not open
    (["--n-embd=30", "--n-head=4"], "divisible by n_head"),  # the config is invalid
    (["--init-from", "{tmp}/no-such-model"], "no-such-model"),  # the model does not build
], ids=["data", "config", "model"])
def test_overwrite_keeps_the_old_run_when_the_new_one_fails_a_check(
    old_run: Path, char_data: Path, tmp_path: Path, gptlab, bad: list[str], fragment: str
) -> None:
    before = snapshot(old_run)
    args = ["train", "--data", str(char_data), "--out", str(old_run), "--overwrite", "--no-progress", *TINY_ARGS]
    code, _, err = gptlab(*args, *(arg.format(tmp=tmp_path) for arg in bad))
    one_line_error(code, err, 2, fragment)
    assert snapshot(old_run) == before


def test_overwrite_refuses_a_run_that_also_holds_the_users_files(
    old_run: Path, char_data: Path, gptlab
) -> None:
    (old_run / "notes.txt").write_text("what I learnt from this run\n")
    before = snapshot(old_run)
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(old_run), "--overwrite", "--no-progress",
                          *TINY_ARGS)
    one_line_error(code, err, 2, "also holds notes.txt")
    assert snapshot(old_run) == before


@pytest.mark.slow
def test_overwrite_replaces_a_run_entirely(old_run: Path, char_data: Path, gptlab) -> None:
    before = snapshot(old_run)
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(old_run), "--overwrite", "--no-progress",
                          *TINY_ARGS, "--max-iters=5", "--seed=5")
    assert code == 0, err
    assert set(snapshot(old_run)) == set(before)  # the same kinds of files, all of them rewritten
    assert steps_logged(old_run) == [5]  # the old run's rows went with it
    assert json.loads((old_run / "train_config.json").read_text())["seed"] == 5


@pytest.mark.parametrize("below", [False, True], ids=["file", "below-a-file"])
def test_out_naming_a_file_is_refused(char_data: Path, tmp_path: Path, gptlab, below: bool) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    out = notes / "run" if below else notes
    for extra in ([], ["--overwrite"]):
        code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS, *extra)
        one_line_error(code, err, 2, "is a file")
    assert notes.read_text() == "keep me\n"


def test_an_unwritable_output_path_is_one_line_with_exit_3(
    old_run: Path, char_data: Path, tmp_path: Path, gptlab, read_only
) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shutil.copytree(old_run, shelf / "run")
    before = snapshot(shelf)
    read_only(shelf)
    for out, extra in ((shelf / "new", []), (shelf / "run", ["--overwrite"])):
        code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS, *extra)
        one_line_error(code, err, 3, str(out), "read-only file system")
    assert snapshot(shelf) == before


@pytest.mark.slow
def test_a_run_in_use_is_refused_and_a_killed_run_resumes(char_data: Path, tmp_path: Path, gptlab) -> None:
    out, marker = tmp_path / "run", tmp_path / "holding"
    args = ["train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS]
    child = subprocess.Popen([sys.executable, "-c", HOLDING_CHILD, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env=child_env(HOLD_AT_CALL="15", HOLD_MARKER=str(marker)))
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():  # at step 15, after the checkpoint of step 10
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the child never reached step 15"
            time.sleep(0.05)
        before = snapshot(out)
        for extra in (["--overwrite"], ["--resume"]):
            code, _, err = gptlab(*args, *extra)
            one_line_error(code, err, 3, "another gptlab train is using this run directory")
        assert snapshot(out) == before
        child.send_signal(signal.SIGKILL)  # the kernel drops its lock: nothing stale is left to clean
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    code, _, err = gptlab(*args, "--resume")
    assert code == 0, err
    assert steps_logged(out) == [5, 10, 15, 20, 25, 30]


def start_child(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptlab", *args], cwd=cwd, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_started_together_into_one_directory(char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS]
    children = [start_child(args, tmp_path) for _ in range(2)]
    results = sorted((child.wait(timeout=300), child.stderr.read()) for child in children)
    for child in children:
        child.stderr.close()
    (ok, _), (refused, err) = results
    assert ok == 0
    assert refused in (2, 3) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "another gptlab train is using" in err or "already holds a run" in err, err
    assert steps_logged(out) == [5, 10, 15, 20, 25, 30]


@pytest.mark.slow
def test_auto_numbered_runs_started_together_get_numbers_of_their_own(char_data: Path, tmp_path: Path) -> None:
    (tmp_path / "runs" / "run-1").mkdir(parents=True)  # just claimed by a run still setting up
    children = [start_child(["train", "--data", str(char_data), "--no-progress", *TINY_ARGS], tmp_path)
                for _ in range(2)]
    for child in children:
        assert child.wait(timeout=300) == 0, child.stderr.read()
        child.stderr.close()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-1", "run-2", "run-3"]
    assert not any((tmp_path / "runs" / "run-1").iterdir())
    for name in ("run-2", "run-3"):
        assert steps_logged(tmp_path / "runs" / name) == [5, 10, 15, 20, 25, 30]
