"""What a run tells its user: a time-limited run's bar counts seconds with a true ETA, the final line
says what --max-time counted, a run the busy CPU starved says so, and the next commands to try."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from helpers import TINY_ARGS, TINY_RUN

from gptlab.train import build_train_config, train
from gptlab.train import progress as progress_module
from gptlab.train.progress import CpuWait, busy_warning


@pytest.mark.slow
def test_a_time_limited_runs_bar_counts_the_seconds_of_its_budget(
    char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = build_train_config(overrides={**TINY_RUN, "data": str(char_data), "out": str(tmp_path / "run"),
                                           "max_iters": 100_000, "max_time": 3.0, "eval_interval": 0})
    result = train(config, show_progress=True)
    assert result.step < 100_000 and result.seconds >= 3.0
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"train: +\d+%\|.*\| \d/3 s \[\d\d:\d\d<\d\d:\d\d, step=[\d,]+", bar), bar
    assert "/100000" not in bar and "100,000" not in bar


def test_a_step_limited_runs_bar_counts_steps(char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = build_train_config(overrides={**TINY_RUN, "data": str(char_data), "out": str(tmp_path / "run"),
                                           "max_iters": 6, "eval_interval": 0})
    train(config, show_progress=True)
    assert "6/6" in capsys.readouterr().err


def test_the_threads_waiting_for_a_core_are_measured() -> None:
    wait = CpuWait()
    deadline = time.perf_counter() + 0.05
    while time.perf_counter() < deadline:
        pass
    share = wait.share()
    if share is None:
        pytest.skip("this kernel does not report the threads' run and wait times (/proc/self/task/*/schedstat)")
    assert 0.0 <= share <= 1.0


def test_the_busy_warning_names_the_steps_a_quiet_machine_gives() -> None:
    timed = build_train_config(overrides={"max_time": 240.0})
    message = busy_warning(117, 0.75, timed, "cpu")
    assert message.startswith("the CPU was busy: this run's threads waited for a core 75% of the time")
    assert "so 117 steps where a quiet machine gives about 468; expect a weaker model" in message
    assert busy_warning(117, 0.2, timed, "cpu") == ""  # hardly waited
    assert busy_warning(117, 0.75, timed, "cuda") == ""  # the GPU did the work
    assert busy_warning(117, 0.75, build_train_config(), "cpu") == ""  # a step budget buys the same model, later
    assert busy_warning(117, None, timed, "cpu") == ""  # not measured


@pytest.mark.slow
def test_the_command_line_warns_of_a_busy_cpu_and_says_what_the_time_counted(
    char_data: Path, tmp_path: Path, gptlab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_module.CpuWait, "share", lambda self: 0.8)  # as if 4 programs had spun alongside
    out = tmp_path / "run"
    code, stdout, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS,
                               "--max-iters=100000", "--max-time=2", "--eval-interval=0")
    assert code == 0, err
    assert re.search(r"gptlab train: warning: the CPU was busy: .* 80% .*, so [\d,]+ steps where a quiet machine "
                     r"gives about [\d,]+; expect a weaker model", err), err
    assert re.search(r"steps in 2 s of training \(what --max-time counts: steps, evaluations, checkpoints\), "
                     r"then \d+ s for the final evaluation and report", stdout), stdout
    assert f"next:\n  gptlab sample {out} --max-new-tokens 500" in stdout
    assert f"gptlab serve {out}" in stdout and f"gptlab eval {out} --data {char_data.resolve()} --baselines" in stdout


@pytest.mark.slow
def test_a_quiet_run_is_not_warned(char_data: Path, tmp_path: Path, gptlab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module.CpuWait, "share", lambda self: 0.05)
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--no-progress", *TINY_ARGS,
                          "--max-iters=100000", "--max-time=1", "--eval-interval=0")
    assert code == 0 and "warning" not in err, err
