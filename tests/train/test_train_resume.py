"""--resume: from any directory, with any option typed counting (even one equal to its default), and
train_config.json recording what the resumed run used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY_ARGS, TINY_RUN, steps_logged


def saved(run_dir: Path) -> dict:
    return json.loads((run_dir / "train_config.json").read_text())


@pytest.fixture
def relative_run(char_data: Path, tmp_path: Path, gptlab, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run started in tmp_path/work with a relative --data and --out, trained to step 20."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(char_data, work / "data")
    monkeypatch.chdir(work)
    code, _, err = gptlab("train", "--data", "data", "--out", "run", "--no-progress", *TINY_ARGS, "--max-iters=20")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)  # and resumed from elsewhere
    return work / "run"


@pytest.mark.slow
def test_resume_works_from_another_directory(relative_run: Path, gptlab) -> None:
    assert saved(relative_run)["data"] == str(relative_run.parent / "data")  # stored resolved
    code, out, err = gptlab("train", "--out", str(relative_run), "--resume", "--no-progress", "--max-iters=30")
    assert code == 0, err
    assert "ignoring" not in err and "30 steps" in out
    assert steps_logged(relative_run) == [5, 10, 15, 20, 25, 30]


@pytest.mark.slow
def test_options_given_with_resume_are_recorded_and_may_equal_their_default(relative_run: Path, gptlab) -> None:
    # the run logged every 5 steps; 10 is TrainConfig's default, and typing it must still count
    code, _, err = gptlab("train", "--out", str(relative_run), "--resume", "--no-progress", "--max-iters=40",
                          "--log-interval=10", "--eval-iters=3")
    assert code == 0, err
    assert steps_logged(relative_run) == [5, 10, 15, 20, 30, 40]
    options = saved(relative_run)
    assert (options["max_iters"], options["log_interval"], options["eval_iters"]) == (40, 10, 3)
    assert options["lr"] == 1e-3 and options["n_layer"] == TINY_RUN["n_layer"]  # the rest as saved


@pytest.mark.slow
def test_resume_keeps_options_that_would_change_the_computation(relative_run: Path, gptlab) -> None:
    code, _, err = gptlab("train", "--out", str(relative_run), "--resume", "--no-progress", "--max-iters=25",
                          "--lr=0.5", "--n-layer=4")
    assert code == 0, err
    assert "--resume keeps the run's saved options; ignoring --lr, --n-layer" in err
    assert (saved(relative_run)["lr"], saved(relative_run)["n_layer"]) == (1e-3, TINY_RUN["n_layer"])


@pytest.mark.slow
def test_a_moved_dataset_is_given_with_data(relative_run: Path, tmp_path: Path, gpt2_data: Path, gptlab) -> None:
    moved = tmp_path / "moved-data"
    shutil.move(relative_run.parent / "data", moved)
    code, _, err = gptlab("train", "--out", str(relative_run), "--resume", "--no-progress", "--max-iters=25")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = gptlab("train", "--out", str(relative_run), "--resume", "--no-progress", "--max-iters=25",
                          "--data", str(gpt2_data))
    assert code == 2 and "its tokenizer has 50257 tokens, the run's model" in err, err
    code, _, err = gptlab("train", "--out", str(relative_run), "--resume", "--no-progress", "--max-iters=25",
                          "--data", str(moved))
    assert code == 0, err
    assert saved(relative_run)["data"] == str(moved)
