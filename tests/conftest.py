"""Shared fixtures: a tiny corpus, its prepared data, and a tiny trained run, built once per session."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.data import prepare
from gptlab.model import GPT
from gptlab.train import build_train_config, train
from gptlab.train.device import compile_unavailable

# The tests' tensors are tiny: one thread avoids two OpenMP threads stalling each other on them, which
# made the suite several times slower whenever anything else was running on this 2-core machine.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The kernel choices the tests measure stay in a temporary file of this session, not ~/.cache. Set at
# import, before any test module copies os.environ for its child processes, so that a child (a resumed
# run) chooses as the run it resumes did.
_KERNEL_CACHE = Path(tempfile.mkdtemp(prefix="gptlab-test-kernels-"))
os.environ["GPTLAB_KERNEL_CACHE"] = str(_KERNEL_CACHE / "kernels.json")
atexit.register(shutil.rmtree, _KERNEL_CACHE, ignore_errors=True)
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40


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


TINY_RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=30,
                eval_interval=10, eval_iters=2, log_interval=5, warmup_iters=5, sample_tokens=0)
TINY_ARGS = [f"--{name.replace('_', '-')}={value}" for name, value in TINY_RUN.items()]  # TINY_RUN as options


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child `gptlab train`, read when the child starts: it must see what the
    session's fixtures set (the kernel choices' file among them), not the environment at import."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def expect_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    """A command's failure as the house rules want it: one line naming the problem, no traceback, and
    the exit status of its kind (2: usage and input, 3: the environment)."""
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory under `root`: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def steps_logged(run_dir: Path) -> list[int]:
    """The steps whose training loss metrics.jsonl holds; a step logged twice fails."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return steps


@pytest.fixture(scope="session")
def tiny_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A character-level run trained for 30 steps: enough to exist, not to be good."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = build_train_config(overrides=dict(TINY_RUN, data=str(char_data), out=str(out)))
    train(config, show_progress=False)
    return out


def tiny_model(vocab_size: int = 50, block_size: int = 16, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **overrides)
    return GPT(config).eval()


def needs_shakespeare() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"shared corpus not found at {SHAKESPEARE}")


def needs_compile() -> pytest.MarkDecorator:
    """Skip where torch.compile cannot work here (no C++ compiler, an unsupported Python), saying why."""
    reason = compile_unavailable(torch.device("cpu"))
    return pytest.mark.skipif(bool(reason), reason=reason or "torch.compile works here")


@pytest.fixture
def gptlab(capsys: pytest.CaptureFixture):
    """Run the command line in this process: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    """The command failed with `expected_code` and said so in one line holding every fragment, no traceback."""
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and "Traceback" not in err, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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
