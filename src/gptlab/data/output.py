"""The output directory of `prepare`: refuse what must not be touched, lock it, stage, then commit.

The rules, in the order they are checked:
- `--out ''`, a path that is a file, or one under a file is refused before anything is written;
- a non-empty directory that holds no gptlab dataset is refused (its files are the user's);
- an existing gptlab dataset is replaced only with `overwrite`, and only its own files (meta.json lists
  them); anything else in the directory stays;
- one prepare at a time per directory (a record lock on a lock file in it); a second one is refused;
- the new dataset is built in a staging directory inside the output (same file system, so it moves
  in by rename) and replaces the old one only when it is complete. Until then a failure (a full disk,
  a bad input found late, a kill) leaves the previous dataset as it was; a staging directory left by a
  killed run is removed by the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json, environment_errors, fsync_directory, remove_temporaries

from .layout import FORMAT, FORMAT_VERSION, LOCK_FILE, META_FILE, STAGING_PREFIX, Existing, inspect


class OutputDir:
    def __init__(self, path: str | Path) -> None:
        if not str(path).strip():
            raise GptlabError("--out is empty; name the data directory to write")
        self.path = Path(path)

    def check(self, overwrite: bool) -> Existing:
        """Refuse, before anything is written, an output that is not ours to write; what is there."""
        for parent in (self.path, *self.path.parents):
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    what = "--out" if parent == self.path else "--out is under"
                    raise GptlabError(f"{what} {parent}, which is a file, not a directory; choose a directory")
                break
        existing = inspect(self.path)
        if existing.kind == "foreign":
            raise GptlabError(f"{self.path} is not empty and holds no gptlab dataset; prepare writes only into a new "
                              "or empty directory or over a gptlab dataset, so choose another --out")
        if existing.is_dataset and not overwrite:
            raise GptlabError(f"{self.path} already holds a gptlab dataset; use --overwrite to replace it")
        return existing

    @contextlib.contextmanager
    def staging(self, overwrite: bool) -> Iterator[Path]:
        """Lock the directory (creating it if need be) and give a fresh, empty staging directory in it;
        the staging directory is gone afterwards, whatever happened, and so is a directory this call
        created if nothing was committed into it."""
        created = not self.path.exists()
        with environment_errors(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        committed = False
        try:
            try:
                # a POSIX record lock, not flock: it belongs to this process alone, so the tokenising
                # workers forked later do not hold it, and it is gone the moment this process dies
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise GptlabError(f"another gptlab prepare is writing {self.path}; wait for it to finish") from None
            self.check(overwrite)  # again, now that no other prepare can change it
            for stale in self.path.glob(STAGING_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
            remove_temporaries(self.path)
            with environment_errors(self.path):
                staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
            try:
                yield staging
                committed = (self.path / META_FILE).is_file()
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            if created and not committed:
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            os.close(lock)

    def commit(self, staging: Path, meta: dict) -> None:
        """Replace the old dataset (if any) by the staged one. meta.json, written last, is the commit; while
        the files move, meta.json says "incomplete", so no reader takes a mixture of two datasets."""
        existing = inspect(self.path)
        new_files = list(meta["files"])
        in_the_way = [name for name in new_files if (self.path / name).exists() and name not in existing.files]
        if in_the_way:
            raise GptlabError(f"{self.path / in_the_way[0]} is no part of the old dataset and would be replaced; "
                              "move it away and run again")
        with environment_errors(self.path):
            if existing.is_dataset:
                every = sorted(set(existing.files) | set(new_files))
                atomic_write_json(self.path / META_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                          "incomplete": True, "files": every})
                for name in existing.files:
                    if name not in new_files:
                        (self.path / name).unlink(missing_ok=True)
            for name in new_files:
                os.replace(staging / name, self.path / name)
            fsync_directory(self.path)
            atomic_write_json(self.path / META_FILE, meta)
