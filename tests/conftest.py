"""Shared fixtures: a tiny corpus, its prepared data, and a tiny trained run, built once per session.
Shared functions and constants live in helpers.py."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.data import prepare
from gptlab.train import build_train_config, train
from helpers import TINY_RUN, TINY_TEXT

# The tests' tensors are tiny: one thread avoids two OpenMP threads stalling each other on them, which
# made the suite several times slower whenever anything else was running on this 2-core machine.
torch.set_num_threads(1)

# The kernel choices the tests measure stay in a temporary file of this session, not ~/.cache. Set at
# import, before any test module copies os.environ for its child processes, so that a child (a resumed
# run) chooses as the run it resumes did.
_KERNEL_CACHE = Path(tempfile.mkdtemp(prefix="gptlab-test-kernels-"))
os.environ["GPTLAB_KERNEL_CACHE"] = str(_KERNEL_CACHE / "kernels.json")
atexit.register(shutil.rmtree, _KERNEL_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(TINY_TEXT)
    return path


@pytest.fixture(scope="session")
def char_data(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "char"
    prepare([str(tiny_corpus)], "char", out)
    return out


@pytest.fixture(scope="session")
def gpt2_data(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "gpt2"
    prepare([str(tiny_corpus)], "gpt2", out)
    return out


@pytest.fixture(scope="session")
def tiny_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A character-level run trained for 30 steps: enough to exist, not to be good."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = build_train_config(overrides=dict(TINY_RUN, data=str(char_data), out=str(out)))
    train(config, show_progress=False)
    return out


@pytest.fixture
def one_thread():
    """One thread, as in the subprocesses: CPU results are bit-identical only at equal thread counts
    (resume, gradient accumulation), and a busy 2-core machine runs tiny models far faster on one.
    Modules that need it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gptlab(capsys: pytest.CaptureFixture):
    """Run the command line in this process: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def small_disk(tmp_path: Path):
    """A directory on a 256 KiB tmpfs, for what a full disk does; skipped (saying why) where it cannot mount."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full-disk test mounts a small tmpfs, which needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def read_only():
    """A function that makes a directory read-only (a read-only bind mount over itself), for what an
    unwritable output path does; skipped (saying why) where it cannot mount. Root ignores permission bits,
    so chmod alone would not do."""
    mounted: list[Path] = []

    def make(directory: Path) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a read-only test bind-mounts a directory read-only, which needs root and mount(8)")
        for options in (["--bind"], ["-o", "remount,bind,ro"]):
            done = subprocess.run(["mount", *options, str(directory), str(directory)], capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"cannot mount {directory} read-only here: {done.stderr.strip()}")
            if options == ["--bind"]:
                mounted.append(directory)
        return directory

    yield make
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], check=False)
