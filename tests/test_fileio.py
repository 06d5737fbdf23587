"""The one atomic writer: permissions follow the umask, failures are one line, nothing is half-written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gptlab.errors import EnvironmentProblem
from gptlab.fileio import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_via, remove_temporaries


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_of_the_users_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_via(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"y"))
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask
    assert _mode(tmp_path / "b.bin") == 0o666 & ~umask


def test_a_full_disk_keeps_the_old_file_and_says_so_in_one_line(small_disk: Path) -> None:
    target = small_disk / "state.json"
    atomic_write_json(target, {"step": 1})
    with pytest.raises(EnvironmentProblem) as info:
        atomic_write_bytes(target, b"z" * (1 << 20))
    message = str(info.value)
    assert message == f"{target}: no space left on device"
    assert info.value.exit_code == 3
    assert target.read_text() == '{\n  "step": 1\n}\n'  # the previous file, whole
    assert remove_temporaries(small_disk) == []  # and no half-written temporary beside it


def test_an_unwritable_directory_is_a_permission_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) may write into a read-only directory, so the refusal cannot be shown")
        with pytest.raises(EnvironmentProblem, match="permission denied"):
            atomic_write_bytes(locked / "x", b"1")
    finally:
        locked.chmod(0o700)


def test_a_failing_writer_leaves_no_temporary(tmp_path: Path) -> None:
    def explode(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_via(tmp_path / "model.safetensors", explode)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_file_system_is_named(small_disk: Path) -> None:
    import subprocess

    done = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot remount the tmpfs read-only here: {done.stderr.strip()}")
    with pytest.raises(EnvironmentProblem, match="read-only file system"):
        atomic_write_bytes(small_disk / "x", b"1")


def test_writers_that_hide_a_full_disk_still_say_so(small_disk: Path) -> None:
    """torch.save reports ENOSPC as "unexpected pos ...", safetensors as its own error type."""
    import torch
    from safetensors.torch import save_file

    big = {"w": torch.zeros(1 << 17)}  # 512 KiB, on a 256 KiB disk
    with pytest.raises(EnvironmentProblem, match="^.*state.pt: no space left on device$"):
        atomic_write(small_disk / "state.pt", lambda handle: torch.save(big, handle))
    with pytest.raises(EnvironmentProblem, match="^.*model.safetensors: no space left on device$"):
        atomic_write_via(small_disk / "model.safetensors", lambda tmp: save_file(big, str(tmp)))
    assert list(small_disk.iterdir()) == []
