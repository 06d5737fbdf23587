"""What many test files share: the tiny corpus and run settings, a tiny model, and the checks the house
rules ask of every command (one line and the right exit code; nothing touched)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.train.device import compile_unavailable

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40

TINY_RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=30,
                eval_interval=10, eval_iters=2, log_interval=5, warmup_iters=5, sample_tokens=0)
# a tiny Hugging Face GPT-2 config with GPT-2's vocabulary, no dropout: for parity with transformers and peft
TINY_GPT2_SHAPE = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TINY_ARGS = [f"--{name.replace('_', '-')}={value}" for name, value in TINY_RUN.items()]  # TINY_RUN as options

def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child `gptlab train`, read when the child starts: it must see what the
    session's fixtures set (the kernel choices' file among them), not the environment at import."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}

def one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    """The command failed with `expected_code` and said so in one line holding every fragment, no traceback."""
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and "Traceback" not in err, (code, err)
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


POISON = 7  # a token id whose presence in a forward pass's input makes the (patched) model raise


def poison_forward(model: GPT, monkeypatch: pytest.MonkeyPatch, poison: int = POISON) -> None:
    """The model raises on any batch whose input holds `poison`: a batch-level failure that one row causes."""
    hidden_states = model.hidden_states

    def failing(idx: torch.Tensor, *args, **kwargs):
        if (idx == poison).any():
            raise RuntimeError("injected: a poisoned row\nsecond line of the message")
        return hidden_states(idx, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing)
