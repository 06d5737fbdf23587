"""The run directory: checked before any work, claimed and locked for one process, replaced only if a run.

Three promises, because a run directory is where a careless command can destroy the most:
- Only a gptlab run is ever replaced. `--overwrite` empties a directory only when it holds a run's
  marker (train_config.json or training_state.pt) and nothing but files a run writes (`RUN_ENTRIES`);
  a source tree, a dataset or a run with the user's own notes in it is refused with one line. The
  replacing happens in `claim_run_dir`, which training calls after every other check has passed.
- One process per run. The directory is locked with flock(2) for as long as a run uses it; the kernel
  drops the lock when the process ends, however it ends (SIGKILL included), so a lock is never stale.
- Runs started together with the auto-numbered default get different numbers: each number is claimed
  by mkdir(2), which exactly one process can win.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ..errors import EnvironmentProblem, GptlabError
from ..fileio import environment_errors
from ..lora import ADAPTER_FILES
from ..tokenizers import TOKENIZER_FILES
from .state import STATE_FILE

TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
REPORT_FILE = "report.md"  # report.py writes them
REPORT_JSON = "report.json"
RUN_MARKERS = (TRAIN_CONFIG_FILE, STATE_FILE)
# What a model directory holds: the Hugging Face checkpoint (or a LoRA run's adapter) and the files its
# tokenizer writes (gptlab's and Hugging Face's). `best/` holds only these; the run directory holds these
# and the run's own files.
MODEL_ENTRIES = frozenset({CONFIG_FILE, WEIGHTS_FILE}) | TOKENIZER_FILES | ADAPTER_FILES
RUN_ENTRIES = MODEL_ENTRIES | {
    TRAIN_CONFIG_FILE, STATE_FILE, METRICS_FILE, "loss.png", REPORT_FILE, REPORT_JSON, BEST_DIR,
}


def check_run_dir(out: str | Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an `--out` that this run cannot use, before any work is done; changes nothing on disk."""
    if out:
        path = Path(out)
        if path.is_dir():  # a run in progress may be half-written: say it is in use, not what it holds
            os.close(_lock(path))
        _inspect(path, overwrite=overwrite, resume=resume)
    elif resume:
        raise GptlabError("--resume needs --out RUN_DIR, the run to continue")


@dataclass
class RunDirectory:
    """A claimed, locked run directory; `release` unlocks it (and removes it if it was made and is empty)."""

    path: Path
    _fd: int
    _created: bool

    def release(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)  # drops the lock
        self._fd = -1
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # nothing was written: leave no trace of a run that never started


def claim_run_dir(out: str | Path, default_name: str, *, overwrite: bool, resume: bool) -> RunDirectory:
    """Create or open the run directory, lock it, check it again under the lock and that it is writable,
    and empty the old run when overwriting. With no `out`: runs/<default_name>-N, the first free N."""
    if out:
        path = Path(out)
        _inspect(path, overwrite=overwrite, resume=resume)  # the fast, lock-free answer for the common mistakes
        with environment_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
                created = True
            except FileExistsError:
                created = False
    else:
        path, created = _claim_number(Path("runs"), default_name), True
    claimed = RunDirectory(path, _lock(path), created)
    try:
        replace = _inspect(path, overwrite=overwrite, resume=resume)  # another process may have written meanwhile
        with environment_errors(path):
            tempfile.TemporaryFile(dir=path).close()  # writable, before anything is deleted
            if replace:
                for entry in path.iterdir():
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    except BaseException:
        claimed.release()
        raise
    return claimed


def _claim_number(parent: Path, name: str) -> Path:
    with environment_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            candidate = parent / f"{name}-{n}"
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                n += 1


def _lock(path: Path) -> int:
    with environment_errors(path):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EnvironmentProblem(
            f"{path}: another gptlab train is using this run directory; wait for it to end or choose another --out"
        ) from None
    return fd


def _inspect(path: Path, *, overwrite: bool, resume: bool) -> bool:
    """Whether `path` holds a run to replace; raises where the run cannot use it."""
    if path.exists() and not path.is_dir():
        raise GptlabError(f"--out {path} is a file; --out names the directory the run is written to")
    if not path.exists():
        ancestor = next(p for p in path.parents if p.exists())  # "." always exists
        if not ancestor.is_dir():
            raise GptlabError(f"--out {path}: {ancestor} is a file, not a directory")
        if resume:
            raise GptlabError(f"{path}: no {STATE_FILE} to resume from")
        return False
    if resume:
        if not (path / STATE_FILE).is_file():
            raise GptlabError(f"{path}: no {STATE_FILE} to resume from")
        return False
    entries = sorted(path.iterdir())
    if not entries:
        return False
    if not any((path / marker).is_file() for marker in RUN_MARKERS):
        raise GptlabError(
            f"{path} is not a gptlab run (it holds {_some([e.name for e in entries])}); choose a new or empty "
            f"directory for --out (--overwrite replaces only a gptlab run)"
        )
    if not overwrite:
        raise GptlabError(f"{path} already holds a run; pass --overwrite to replace it or --resume to continue it")
    foreign = _foreign_entries(path)
    if foreign:
        raise GptlabError(
            f"{path} is a gptlab run but also holds {_some(foreign)}, which --overwrite would delete; "
            f"move them out or choose another --out"
        )
    return True


def _foreign_entries(path: Path) -> list[str]:
    """The entries of a would-be run directory that no run writes (temporaries of a killed writer are a run's)."""
    foreign = []
    for entry in sorted(path.iterdir()):
        if _is_temporary(entry):
            continue
        if entry.name not in RUN_ENTRIES or (entry.name == BEST_DIR) != (entry.is_dir() and not entry.is_symlink()):
            foreign.append(entry.name)
        elif entry.name == BEST_DIR:
            foreign += [f"{BEST_DIR}/{e.name}" for e in sorted(entry.iterdir())
                        if not _is_temporary(e) and (e.name not in MODEL_ENTRIES or not e.is_file())]
    return foreign


def _is_temporary(entry: Path) -> bool:
    return entry.is_file() and entry.name.startswith(".") and entry.name.endswith(".tmp")


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
