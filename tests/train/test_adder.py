"""The adder task, piece by piece on a tiny budget (the full >= 99% run is benchmarks/adder.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from gptlab.train import adder
from gptlab.train.adder import AdderDataset, all_examples, format_example
from gptlab.checkpoint import load_model
from gptlab.cli import main
from gptlab.errors import GptlabError


def test_every_pair_of_two_digit_numbers_once() -> None:
    examples = all_examples()
    assert len(examples) == len(set(examples)) == 10_000
    assert format_example(15, 57) == "15+57=072" and format_example(98, 35) == "98+35=133"
    for e in examples:
        a, b, c = int(e[:2]), int(e[3:5]), int(e[6:])
        assert e == f"{a:02d}+{b:02d}={c:03d}" and a + b == c


def test_splits_are_disjoint_fixed_and_cover_everything() -> None:
    first, second = AdderDataset(), AdderDataset()
    decoded = {name: {first.tokenizer.decode(row) for row in first.split(name)} for name in ("train", "val", "test")}
    assert [len(decoded[n]) for n in ("train", "val", "test")] == [8000, 1000, 1000]
    assert decoded["train"] | decoded["val"] | decoded["test"] == set(all_examples())
    assert not decoded["train"] & decoded["test"] and not decoded["val"] & decoded["test"]
    for name in ("train", "val", "test"):
        assert np.array_equal(first.split(name), second.split(name))


def test_batches_target_only_the_answer() -> None:
    ds = AdderDataset()
    x, y = ds.get_batch("train", 64, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == torch.int64
    assert (y[:, :5] == -100).all()
    train = {ds.tokenizer.decode(row) for row in ds.split("train")}
    for xi, yi in zip(x.tolist(), y.tolist()):
        text = ds.tokenizer.decode(xi) + ds.tokenizer.decode([yi[-1]])
        assert text in train  # a whole training problem
        assert ds.tokenizer.decode(yi[5:]) == text[6:]  # the targets are its three answer digits


def test_loss_counts_the_answer_digits_only() -> None:
    ds = AdderDataset()
    model = tiny_model(vocab_size=12, block_size=8)
    x, y = ds.get_batch("val", 16, 8, np.random.default_rng(1))
    logits = model(x).logits
    by_hand = F.cross_entropy(logits[:, 5:].reshape(-1, 12), y[:, 5:].reshape(-1))
    assert model(x, y).loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_block_size_must_hold_a_problem() -> None:
    with pytest.raises(GptlabError, match="at least 8"):
        AdderDataset().check_length("train", 7)
    with pytest.raises(GptlabError, match="unknown split"):
        AdderDataset().split("dev")


def test_exact_match_needs_all_three_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grading alone: a stand-in decoder answers right except for sums ending in 7 (one wrong digit)."""
    ds = AdderDataset()

    def decode(model, prompts: torch.Tensor, n: int, temperature: float) -> torch.Tensor:
        assert n == 3 and temperature == 0.0
        a = prompts[:, 0] * 10 + prompts[:, 1]
        b = prompts[:, 3] * 10 + prompts[:, 4]
        s = a + b
        digits = torch.stack([s // 100, s // 10 % 10, s % 10], 1)
        digits[:, 2] = torch.where(s % 10 == 7, (digits[:, 2] + 1) % 10, digits[:, 2])
        return torch.cat([prompts, digits], 1)

    monkeypatch.setattr(adder, "generate", decode)
    result = ds.exact_match(None, "test", batch_size=300)  # several batches
    sums = [int(ds.tokenizer.decode(row)[6:]) for row in ds.split("test")]
    assert result.total == 1000 and result.correct == sum(s % 10 != 7 for s in sums)
    assert 0 < len(result.mistakes) <= 5
    assert all(expected.endswith("7") and answer.endswith("8") for expected, answer in result.mistakes)


def greedy_by_hand(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) -> (B, n): argmax of a full forward pass, n times, with no cache."""
    with torch.no_grad():
        for _ in range(n):
            prompts = torch.cat([prompts, model(prompts).logits[:, -1:].argmax(-1)], 1)
    return prompts[:, -n:]


def test_exact_match_agrees_with_greedy_decoding_by_hand() -> None:
    ds = AdderDataset()
    model = tiny_model(vocab_size=12, block_size=8, seed=3)
    rows = torch.from_numpy(ds.split("val"))
    right = (greedy_by_hand(model, rows[:, :6], 3) == rows[:, 6:]).all(1)
    result = ds.exact_match(model, "val", batch_size=300)
    assert result.total == 1000 and result.correct == int(right.sum())


@pytest.fixture(scope="module")
def adder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adder") / "run"
    code = main(["train", "--preset", "adder", "--out", str(out), "--no-progress", "--max-iters", "30",
                 "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "32", "--eval-interval", "0"])
    assert code == 0
    return out


@pytest.mark.slow
def test_preset_trains_and_reports_test_accuracy(adder_run: Path, capsys: pytest.CaptureFixture) -> None:
    config = json.loads((adder_run / "train_config.json").read_text())
    assert config["task"] == "adder" and config["preset"] == "adder" and config["block_size"] == 8
    facts = json.loads((adder_run / "report.json").read_text())
    report = (adder_run / "report.md").read_text()
    assert 0.0 <= facts["test_exact_match"] <= 1.0
    assert "Exact match on the held-out test problems" in report and f"{facts['test_exact_match']:.2%}" in report
    scored = AdderDataset().exact_match(load_model(adder_run), "test")
    assert scored.accuracy == facts["test_exact_match"]


@pytest.mark.slow
def test_sample_answers_with_the_models_greedy_digits(adder_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    code = main(["sample", str(adder_run), "--prompt", "98+35=", "--temperature", "0", "--max-new-tokens", "3"])
    out = capsys.readouterr().out.strip()
    assert code == 0 and len(out) == 9 and out.startswith("98+35=") and out[6:].isdigit()
    tok = AdderDataset().tokenizer
    expected = greedy_by_hand(load_model(adder_run), torch.tensor([tok.encode("98+35=")]), 3)
    assert out[6:] == tok.decode(expected[0].tolist())
