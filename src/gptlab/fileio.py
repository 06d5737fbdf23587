"""The package's one way of putting a file on disk: atomically, durably, with the user's permissions.

Every file gptlab writes (weights, configs, training state, reports, token shards) goes through
`atomic_write`: the bytes go to a temporary file beside the target, are fsynced, and are renamed over
it, then the directory entry is fsynced. A process killed at any moment, or a disk that fills, leaves
either the previous file or the complete new one, never half of either. The temporary file is created
with the mode a plain `open()` would give (0666 less the umask), not `mkstemp`'s private 0600, so a
model exported for others can be read by them.

Failures of the environment (a full disk, a read-only or unwritable directory) become one
`EnvironmentProblem` naming the file and the cause, which the command line prints in one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import EnvironmentProblem

TEMPORARY_PATTERN = ".*.tmp"  # what a writer killed mid-write leaves behind; see remove_temporaries

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error names its errno
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """One line for an OSError: the file and the cause, e.g. 'runs/x/model.safetensors: no space left on device'."""
    cause = _CAUSES.get(exc.errno or 0) or exc.strerror or str(exc)
    where = path if path is not None else exc.filename
    return f"{where}: {cause}" if where else cause


@contextlib.contextmanager
def environment_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into an EnvironmentProblem with one clear line."""
    try:
        yield
    except EnvironmentProblem:
        raise
    except OSError as exc:
        raise EnvironmentProblem(describe_os_error(exc, path)) from None


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(handle)` on a temporary file beside `path`, then fsync and rename it into place."""

    def produce(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _default_mode())
        with os.fdopen(fd, "wb") as handle:
            recording = _RecordingHandle(handle)
            try:
                write(recording)
            except Exception:
                if recording.error is not None:  # torch.save reports a full disk as "unexpected pos 704 vs 598"
                    raise recording.error from None
                raise

    atomic_write_via(path, produce)


class _RecordingHandle:
    """A file handle that remembers the first OSError a write raised, for writers that replace it by
    an error of their own."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def atomic_write_via(path: str | Path, produce: Callable[[Path], Any]) -> None:
    """Let `produce(tmp)` write a temporary path beside `path` (for writers that take a file name,
    such as safetensors'), then fsync it and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with environment_errors(path):
        try:
            produce(tmp)
            os.chmod(tmp, _default_mode())
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            reported = _RUST_OS_ERROR.search(str(exc)) if not isinstance(exc, OSError) else None
            if reported:  # safetensors' writer says "I/O error: No space left on device (os error 28)"
                errno_ = int(reported.group(1))
                raise OSError(errno_, os.strerror(errno_)) from None
            raise
        fsync_directory(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def fsync_directory(directory: str | Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(directory: str | Path) -> list[Path]:
    """Delete the half-written files a killed writer left in `directory`; returns what was removed."""
    removed = []
    for leftover in Path(directory).glob(TEMPORARY_PATTERN):
        if leftover.is_file():
            leftover.unlink()
            removed.append(leftover)
    return removed
