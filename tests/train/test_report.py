"""RUN_DIR/report.md: what the run was, and its validation perplexity against a bigram."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptlab.checkpoint import load_model
from gptlab.train.config import TrainConfig
from gptlab.data import TokenDataset
from gptlab.evaluate import score, score_ngram
from gptlab.evaluate.ngram import KneserNey, NGramCounts
from gptlab.train.report import headline


def test_report_states_the_run(tiny_run: Path) -> None:
    report = (tiny_run / "report.md").read_text()
    facts = json.loads((tiny_run / "report.json").read_text())
    config = TrainConfig(**json.loads((tiny_run / "train_config.json").read_text()))
    model = load_model(tiny_run)
    assert facts["parameters"] == model.num_parameters()
    assert f"| parameters | {model.num_parameters():,} " in report
    assert facts["steps"] == config.max_iters == 30
    assert facts["tokens_seen"] == 30 * config.batch_size * config.block_size
    assert f"| tokens seen | {facts['tokens_seen']:,} |" in report
    assert "| wall time |" in report and facts["seconds"] > 0
    assert f"| final validation loss | {facts['val_loss']:.4f} |" in report
    assert "![training and validation loss](loss.png)" in report and (tiny_run / "loss.png").is_file()
    for name in ("n_layer", "lr", "optimizer", "schedule"):  # the configuration, every option
        assert f"| `{name}` | `{getattr(config, name)!r}` |" in report


def test_report_compares_with_the_bigram_on_the_same_tokens(tiny_run: Path) -> None:
    facts = json.loads((tiny_run / "report.json").read_text())
    dataset = TokenDataset(json.loads((tiny_run / "train_config.json").read_text())["data"])
    val = dataset.split("val")
    assert facts["val_tokens_scored"] == len(val) - 1  # a small split is scored whole
    model_score = score(load_model(tiny_run), dataset.tokenizer, val)
    bigram = KneserNey(NGramCounts(dataset.split("train"), dataset.tokenizer.vocab_size, 2), 2)
    assert facts["val_perplexity"] == pytest.approx(model_score.perplexity, rel=1e-6)
    assert facts["bigram_val_perplexity"] == pytest.approx(score_ngram(bigram, dataset.tokenizer, val).perplexity)
    report = (tiny_run / "report.md").read_text()
    assert "## Validation perplexity against n-gram baselines" in report
    assert f"| this model | {model_score.loss:.4f} | {model_score.perplexity:.2f} |" in report
    assert "| bigram (Kneser-Ney) |" in report
    assert headline(tiny_run).startswith(f"validation perplexity {facts['val_perplexity']:.3f} vs ")
