"""What the machine or a damaged run refuses during training ends in one line and exit 2 or 3, and the
last good checkpoint survives: a full disk mid-checkpoint, running out of memory, a training state
missing its keys, a device this machine lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARGS, one_line_error, snapshot

from gptlab.model import GPT
from gptlab.train.state import checkpoint_keys, load_checkpoint

# small enough that a whole run (checkpoint, best/, report, loss plot) fits on the 256 KiB disk
MICRO = ["--n-layer=1", "--n-head=1", "--n-embd=8", "--block-size=8", "--batch-size=4", "--eval-interval=2",
         "--eval-iters=1", "--log-interval=1", "--sample-tokens=0", "--no-progress"]


def fill(directory: Path) -> Path:
    """Write a ballast file until the file system holding `directory` is full."""
    ballast = directory / "ballast"
    with open(ballast, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    return ballast


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(
    small_disk: Path, char_data: Path, gptlab, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = small_disk / "run"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), *MICRO, "--max-iters=4")
    assert code == 0, err
    before = snapshot(out)
    forward, calls = GPT.forward, []

    def filling_forward(model: GPT, *args, **kwargs):  # the disk fills during step 5, before step 6's checkpoint
        calls.append(None)
        if len(calls) == 1:
            fill(small_disk)
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", filling_forward)
    code, _, err = gptlab("train", "--out", str(out), "--resume", "--max-iters=8", "--no-progress")
    monkeypatch.setattr(GPT, "forward", forward)
    one_line_error(code, err, 3, "no space left on device", "(saving step 6)",
                          "--resume continues from the checkpoint of step 4")
    after = snapshot(out)
    for name in ("training_state.pt", "model.safetensors", "config.json"):
        assert after[name] == before[name], name  # the checkpoint of step 4, whole
    assert load_checkpoint(out)["step"] == 4
    assert not list(out.rglob(".*.tmp"))  # no half-written temporary left to fill the disk further
    (small_disk / "ballast").unlink()
    code, _, err = gptlab("train", "--out", str(out), "--resume", "--max-iters=8", "--no-progress")
    assert code == 0, err
    assert load_checkpoint(out)["step"] == 8


def test_running_out_of_memory_is_one_line_with_exit_3(
    char_data: Path, tmp_path: Path, gptlab, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(model: GPT, *args, **kwargs):  # what torch's CPU allocator raises when malloc fails
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 40000000000000 bytes. Error code 12")

    monkeypatch.setattr(GPT, "forward", exhausted)
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--no-progress", *TINY_ARGS)
    one_line_error(code, err, 3, "out of memory on cpu", "--batch-size", "--grad-accum")


def test_any_other_runtime_error_keeps_its_traceback(
    char_data: Path, tmp_path: Path, gptlab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug is not the user's problem: it must stay visible, not turn into an 'out of memory' line."""
    def broken(model: GPT, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(GPT, "forward", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        gptlab("train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--no-progress", *TINY_ARGS)


@pytest.fixture
def finished_run(char_data: Path, tmp_path: Path, gptlab) -> Path:
    out = tmp_path / "run"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS,
                          "--max-iters=10")
    assert code == 0, err
    return out


@pytest.mark.parametrize("missing", ["optimizer", "data_rng", "step"])
def test_a_training_state_missing_keys_is_one_line(finished_run: Path, gptlab, missing: str) -> None:
    state = torch.load(finished_run / "training_state.pt", weights_only=True)
    assert set(checkpoint_keys()) <= set(state)  # what the trainer saves is what it checks for
    del state[missing]
    torch.save(state, finished_run / "training_state.pt")
    code, _, err = gptlab("train", "--out", str(finished_run), "--resume", "--max-iters=12", "--no-progress")
    one_line_error(code, err, 2, "training_state.pt: the training state lacks", missing)


@pytest.mark.parametrize("damage", ["weights", "optimizer", "rng", "model_config"])
def test_a_training_state_with_entries_that_do_not_fit_is_one_line(finished_run: Path, gptlab, damage: str) -> None:
    state = torch.load(finished_run / "training_state.pt", weights_only=True)
    if damage == "weights":
        state["model"]["transformer.wte.weight"] = torch.zeros(3, 3)
    elif damage == "optimizer":
        state["optimizer"] = {"state": {}, "param_groups": []}
    elif damage == "rng":
        state["data_rng"] = {"bit_generator": "nonsense"}
    else:
        state["model_config"] = {"n_layer": "two"}
    torch.save(state, finished_run / "training_state.pt")
    code, _, err = gptlab("train", "--out", str(finished_run), "--resume", "--max-iters=12", "--no-progress")
    one_line_error(code, err, 2, "training_state.pt: cannot resume from this training state")


def test_a_damaged_train_config_is_one_line(finished_run: Path, gptlab) -> None:
    path = finished_run / "train_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lr": "fast"}))
    code, _, err = gptlab("train", "--out", str(finished_run), "--resume", "--max-iters=12", "--no-progress")
    one_line_error(code, err, 2, f"{path}: --lr must be a finite number, got 'fast'")


@pytest.mark.parametrize("device, available, expected_code, fragment", [
    ("mps", torch.backends.mps.is_available(), 3, "--device mps: this torch has no MPS"),
    ("cuda", torch.cuda.is_available(), 3, "--device cuda: CUDA is not available"),
    ("cuda:7", torch.cuda.device_count() > 7, 3, "--device cuda:7"),
    ("tpu", False, 2, "unknown device 'tpu'"),
    ("meta", False, 2, "unknown device 'meta'"),
])
def test_a_device_this_machine_lacks_is_one_line(
    char_data: Path, tmp_path: Path, gptlab, device: str, available: bool, expected_code: int, fragment: str
) -> None:
    if available:
        pytest.skip(f"this machine has {device}, so its absence cannot be shown")
    out = tmp_path / "run"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS,
                          "--device", device)
    one_line_error(code, err, expected_code, fragment)
    assert not out.exists()
