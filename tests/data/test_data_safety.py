"""prepare never destroys what it was not asked to replace (issue 13): each refusal is one line with its
exit status, and every file that was there before is still there, byte for byte."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_RUN, TINY_TEXT, one_line_error

from gptlab.data import TokenDataset, prepare
from gptlab.data import output as output_module
from gptlab.data.layout import LOCK_FILE, STAGING_PREFIX
from gptlab.errors import GptlabError

TRAIN_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def staging_dirs(directory: Path) -> list[Path]:
    return list(directory.glob(STAGING_PREFIX + "*"))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_text(TINY_TEXT)
    return tmp_path / "corpus.txt"


@pytest.fixture
def dataset(tmp_path: Path, corpus: Path) -> Path:
    prepare([str(corpus)], "gpt2", tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_directory_that_holds_no_dataset_is_refused(tmp_path, corpus, gptlab, overwrite):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "meta.json").write_text('{"chapters": 7}')
    (mine / "vocab.json").write_text('{"my": "glossary"}')
    (mine / "merges.txt").write_text("my notes\n")
    before = snapshot(mine)
    code, _, err = gptlab("prepare", str(corpus), "--out", str(mine), *overwrite)
    one_line_error(code, err, 2, str(mine), "holds no gptlab dataset")
    assert snapshot(mine) == before and not (mine / LOCK_FILE).exists()


def test_an_empty_out_is_refused(tmp_path, corpus, gptlab, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = gptlab("prepare", str(corpus), "--out", "")
    one_line_error(code, err, 2, "--out is empty")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_out_that_is_a_file_or_under_one_is_refused(tmp_path, corpus, gptlab, below):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = gptlab("prepare", str(corpus), "--out", str(tmp_path / "notes.txt" / below))
    one_line_error(code, err, 2, "notes.txt, which is a file, not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_checks_every_input_before_it_touches_the_old_dataset(tmp_path, dataset, gptlab):
    before = snapshot(dataset)
    code, _, err = gptlab("prepare", str(tmp_path / "typo.txt"), "--out", str(dataset), "--overwrite")
    one_line_error(code, err, 2, "typo.txt does not exist")
    assert snapshot(dataset) == before


def test_a_bad_input_found_late_leaves_the_old_dataset(tmp_path, dataset, gptlab):
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "a.txt").write_text(TINY_TEXT)
    (tmp_path / "late" / "b.bin").write_bytes(b"\x00\x01binary")
    before = snapshot(dataset)
    code, _, err = gptlab("prepare", str(tmp_path / "late"), "--out", str(dataset), "--overwrite")
    one_line_error(code, err, 2, "b.bin is not a text file")
    assert snapshot(dataset) == before and not staging_dirs(dataset)


def test_overwrite_replaces_only_the_datasets_own_files(tmp_path, dataset, corpus):
    (dataset / "README.md").write_text("what this data is")
    old = json.loads((dataset / "meta.json").read_text())
    meta = prepare([str(corpus)], "char", dataset, overwrite=True)
    assert (dataset / "README.md").read_text() == "what this data is"
    assert not (dataset / "vocab.json").exists() and not (dataset / "merges.txt").exists()  # GPT-2's, gone
    assert sorted(p.name for p in dataset.iterdir()) == sorted([*meta["files"], "meta.json", LOCK_FILE, "README.md"])
    assert TokenDataset(dataset).tokenizer.name == "char" and old["tokenizer"] == "gpt2"


def test_a_dataset_of_the_older_format_is_recognised_and_replaced(tmp_path, corpus, gptlab):
    old = tmp_path / "old"
    old.mkdir()
    (old / "train.bin").write_bytes(np.zeros(40, np.uint16).tobytes())
    (old / "val.bin").write_bytes(np.zeros(4, np.uint16).tobytes())
    (old / "gptlab_tokenizer.json").write_text('{"type": "char", "chars": ["a"]}')
    (old / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 1, "dtype": "uint16",
                                               "train_tokens": 40, "val_tokens": 4, "sources": []}))
    (old / "notes.txt").write_text("keep me")
    before = snapshot(old)
    code, _, err = gptlab("prepare", str(corpus), "--out", str(old))
    one_line_error(code, err, 2, "already holds a gptlab dataset", "--overwrite")
    assert snapshot(old) == before
    assert gptlab("prepare", str(corpus), "--out", str(old), "--overwrite")[0] == 0
    assert not (old / "train.bin").exists() and not (old / "val.bin").exists()
    assert (old / "notes.txt").read_text() == "keep me" and len(TokenDataset(old).split("train")) > 0


def test_a_read_only_output_is_exit_3_and_keeps_the_dataset(small_disk, corpus, gptlab):
    data = small_disk / "data"
    prepare([str(corpus)], "char", data)
    before = snapshot(data)
    done = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot remount the tmpfs read-only here: {done.stderr.strip()}")
    code, _, err = gptlab("prepare", str(corpus), "--out", str(data), "--overwrite")
    one_line_error(code, err, 3, str(data), "read-only file system")
    code, _, err = gptlab("prepare", str(corpus), "--out", str(small_disk / "new"))
    one_line_error(code, err, 3, "new", "read-only file system")
    assert snapshot(data) == before and len(TokenDataset(data).split("train")) > 0


def test_a_disk_that_fills_is_exit_3_and_keeps_the_old_dataset(small_disk, tmp_path, corpus, gptlab):
    data = small_disk / "data"
    prepare([str(corpus)], "char", data)
    before = snapshot(data)
    big = tmp_path / "big.txt"
    big.write_text(TINY_TEXT * 20)  # 600 KB of uint16 tokens for a 256 KiB disk
    code, _, err = gptlab("prepare", str(big), "--out", str(data), "--overwrite")
    one_line_error(code, err, 3, str(data), "no space left on device")
    assert snapshot(data) == before and not staging_dirs(data)
    assert TokenDataset(data).meta["train_tokens"] < len(TINY_TEXT)
    code, _, err = gptlab("prepare", str(big), "--out", str(small_disk / "fresh"))
    one_line_error(code, err, 3, "no space left on device")
    assert not (small_disk / "fresh").exists()  # the directory it made for the dataset is gone again


def test_a_second_prepare_into_a_locked_directory_is_refused(dataset, corpus, gptlab):
    before = snapshot(dataset)
    # another process holds the lock, as a running prepare does (a record lock: never this process's own)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(dataset / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = gptlab("prepare", str(corpus), "--out", str(dataset), "--overwrite")
    finally:
        holder.kill()
        holder.wait()
    one_line_error(code, err, 2, "another gptlab prepare is writing", str(dataset))
    assert snapshot(dataset) == before


def test_an_interrupted_commit_leaves_a_dataset_nobody_reads_until_it_is_replaced(dataset, corpus, monkeypatch,
                                                                                  gptlab):
    moved = []
    rename = os.rename

    def replace_then_die(src, dst):
        if Path(dst).parent == dataset and Path(dst).suffix == ".bin":  # a new shard moving into place
            if moved:
                raise KeyboardInterrupt  # killed half way through moving the new files in
            moved.append(dst)
        rename(src, dst)

    monkeypatch.setattr(output_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], "char", dataset, overwrite=True, shard_tokens=1000)
    monkeypatch.undo()
    assert len(moved) == 1
    with pytest.raises(GptlabError, match="incomplete dataset.*--overwrite"):
        TokenDataset(dataset)
    code, _, err = gptlab("prepare", str(corpus), "--out", str(dataset))
    one_line_error(code, err, 2, "already holds a gptlab dataset")
    assert gptlab("prepare", str(corpus), "--out", str(dataset), "--overwrite", "--tokenizer", "gpt2")[0] == 0
    meta = TokenDataset(dataset).meta
    assert sorted(p.name for p in dataset.iterdir()) == sorted([*meta["files"], "meta.json", LOCK_FILE])


def _start_prepare(corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A real `gptlab prepare` with two workers, returned once it is writing its staging shards."""
    command = [sys.executable, "-m", "gptlab", "prepare", str(corpus), "--out", str(out), "--tokenizer", "gpt2",
               "--workers", "2", "--no-progress", *extra]
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: a worker outliving its parent must not hang us
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any(d.glob("train-*.bin") for d in staging_dirs(out)) or not _children(process.pid):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.05)
    return process


def _kill(process: subprocess.Popen) -> list[int]:
    """SIGKILL the prepare and wait (10 s at most) for its workers to follow it; their process ids."""
    workers = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    return workers


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def large_corpus(tmp_path: Path) -> Path:
    """Enough text (about 90 MB) that two workers take many seconds over it: the tests kill them long before."""
    (tmp_path / "large.txt").write_text(TINY_TEXT * 3000)
    return tmp_path / "large.txt"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through Linux's /proc")
def test_sigkill_leaves_nothing_train_accepts_and_no_process(tmp_path, large_corpus, corpus, gptlab):
    out = tmp_path / "fresh"
    process = _start_prepare(large_corpus, out)
    try:
        code, _, err = gptlab("prepare", str(corpus), "--out", str(out))  # meanwhile, a second prepare
        one_line_error(code, err, 2, "another gptlab prepare is writing")
    finally:
        workers = _kill(process)
    assert 1 <= len(workers) <= 2  # one or two: the pool starts its second worker when the first is busy
    assert not any(_alive(pid) for pid in workers)  # the workers died with their parent
    assert staging_dirs(out)  # what the killed run left
    with pytest.raises(GptlabError, match="not a prepared data directory"):
        TokenDataset(out)
    code, _, err = gptlab("train", "--data", str(out), "--out", str(tmp_path / "run"), "--no-progress", *TRAIN_ARGS)
    one_line_error(code, err, 2, "not a prepared data directory")
    assert gptlab("prepare", str(corpus), "--out", str(out))[0] == 0
    assert not staging_dirs(out) and len(TokenDataset(out).split("train")) > 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through Linux's /proc")
def test_sigkill_during_overwrite_keeps_the_old_dataset(dataset, large_corpus, corpus, gptlab):
    before = snapshot(dataset)
    workers = _kill(_start_prepare(large_corpus, dataset, "--overwrite"))
    assert workers and not any(_alive(pid) for pid in workers)
    assert {k: v for k, v in snapshot(dataset).items() if not k.startswith(STAGING_PREFIX)} == before
    assert TokenDataset(dataset).meta["train_tokens"] > 0
    assert gptlab("prepare", str(corpus), "--out", str(dataset), "--overwrite", "--tokenizer", "char")[0] == 0
    assert not staging_dirs(dataset)


def test_ids_outside_the_vocabulary_are_one_line_naming_the_shard(tmp_path, corpus, gptlab):
    data = tmp_path / "data"
    meta = prepare([str(corpus)], "char", data)
    for split in ("train", "val"):
        shard = data / meta["shards"][split][0]["file"]
        shard.write_bytes(np.full(meta[f"{split}_tokens"], 999, np.uint16).tobytes())
    with pytest.raises(GptlabError, match=r"train-000000.bin holds token id 999, outside the vocabulary"):
        TokenDataset(data).get_batch("train", 2, 8, np.random.default_rng(0))
    code, _, err = gptlab("train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress", *TRAIN_ARGS)
    one_line_error(code, err, 2, "-000000.bin holds token id 999", "outside the vocabulary")
