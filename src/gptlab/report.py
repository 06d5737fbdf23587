"""RUN_DIR/report.md: one page that says what a training run was and how well it did.

Written at the end of every run, next to the model it describes. A text run compares its validation
perplexity with a Kneser-Ney bigram fitted on the same training split and scored on the same tokens;
an adder run reports its exact-match accuracy on the held-out test problems. The headline figures also
go to `report.json`, for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .adder import AdderDataset
from .fileio import atomic_write_json, atomic_write_text
from .data import TokenDataset
from .evaluate import Score, markdown_table, score, score_ngram
from .model import GPT
from .evaluate.ngram import KneserNey, NGramCounts

if TYPE_CHECKING:  # a type only: evaluation imports nothing of training
    from .train.config import TrainConfig

REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
# Scoring the whole validation split can take minutes for a big model on a CPU, so the report scores a
# prefix sized to about 1e12 FLOPs (2 per parameter per token, each token read twice at stride
# context/2), at most 100,000 tokens. `gptlab eval` scores the whole split.
REPORT_PARAMETER_TOKENS = 250_000_000_000
REPORT_MAX_TOKENS = 100_000


class TrainSummary(Protocol):
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    seconds: float
    tokens_seen: int


def write_report(
    summary: TrainSummary,
    config: TrainConfig,
    model: GPT,
    dataset: TokenDataset | AdderDataset,
    device: torch.device | str = "cpu",
) -> Path:
    """Write report.md and report.json into the run directory; return the report's path."""
    run_dir = Path(summary.run_dir)
    headline: dict[str, Any] = {
        "steps": summary.step,
        "tokens_seen": summary.tokens_seen,
        "seconds": summary.seconds,
        "parameters": model.num_parameters(),
        "train_loss": summary.train_loss,
        "val_loss": summary.val_loss,
    }
    lines = [
        f"# Training report: `{run_dir.name}`",
        "",
        "| | |",
        "| --- | ---: |",
        f"| task | {config.task}{f' (preset {config.preset})' if config.preset else ''} |",
        f"| parameters | {model.num_parameters():,} ({model.num_parameters(exclude_embeddings=True):,} without embeddings) |",
        f"| steps | {summary.step:,} |",
        f"| tokens seen | {summary.tokens_seen:,} |",
        f"| wall time | {summary.seconds:,.1f} s |",
        f"| final train loss | {summary.train_loss:.4f} |",
        f"| final validation loss | {summary.val_loss:.4f} |",
        "",
        "Final losses are means over `eval_iters` random batches per split (nats per target token).",
        "",
    ]
    if isinstance(dataset, AdderDataset):
        lines += _adder_section(model, dataset, device, headline)
    else:
        lines += _text_section(model, dataset, config, device, headline)
    lines += _tasks_section(run_dir / "metrics.jsonl", headline)
    lines += ["## Loss", "", "![training and validation loss](loss.png)", "", "## Configuration", "",
              "| option | value |", "| --- | --- |"]
    lines += [f"| `{name}` | `{value!r}` |" for name, value in config.to_dict().items()]
    path = run_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_json(run_dir / REPORT_JSON, headline)
    return path


def _adder_section(model: GPT, dataset: AdderDataset, device: torch.device | str, headline: dict) -> list[str]:
    result = dataset.exact_match(model, "test", device)
    headline["test_exact_match"] = result.accuracy
    lines = [
        "## Exact match on the held-out test problems",
        "",
        (f"**{result.accuracy:.2%}** ({result.correct:,} of {result.total:,}), greedy decoding of the three "
         "answer digits after each `ab+cd=` prompt."),
        "",
    ]
    if result.mistakes:
        lines += ["Some mistakes (expected, model's answer):", ""]
        lines += [f"- `{expected}` -> `{answer}`" for expected, answer in result.mistakes]
        lines.append("")
    return lines


def _text_section(
    model: GPT, dataset: TokenDataset, config: TrainConfig, device: torch.device | str, headline: dict
) -> list[str]:
    val = dataset.split("val")
    n = min(len(val), REPORT_MAX_TOKENS, max(4 * config.block_size, REPORT_PARAMETER_TOKENS // model.num_parameters()))
    tokens = val[:n]
    model_score = score(model, dataset.tokenizer, tokens, device=device)
    bigram = KneserNey(NGramCounts(dataset.split("train"), dataset.tokenizer.vocab_size, 2), 2)
    bigram_score = score_ngram(bigram, dataset.tokenizer, tokens)
    headline["val_perplexity"] = model_score.perplexity
    headline["bigram_val_perplexity"] = bigram_score.perplexity
    headline["val_tokens_scored"] = model_score.tokens
    rows: list[tuple[str, Score]] = [("this model", model_score), ("bigram (Kneser-Ney)", bigram_score)]
    whole = "the whole validation split" if n == len(val) else f"the first {n:,} of {len(val):,} validation tokens"
    return [
        "## Validation perplexity against the bigram baseline",
        "",
        (f"On {whole}, every token scored once (model: sliding window, stride {max(1, config.block_size // 2)}). "
         "`gptlab eval RUN --data DATA --baselines` scores the whole split against more baselines."),
        "",
        markdown_table(rows),
        "",
    ]


def _tasks_section(metrics: Path, headline: dict) -> list[str]:
    """The lm-eval task scores `--eval-tasks` logged during training, one row per evaluated step."""
    rows = [row for row in map(json.loads, metrics.read_text().splitlines()) if "task_scores" in row] \
        if metrics.is_file() else []
    if not rows:
        return []
    names = sorted(rows[-1]["task_scores"])
    headline["task_scores"] = rows[-1]["task_scores"]
    lines = ["## lm-eval task scores during training", "",
             "`--eval-tasks`, scored by lm-evaluation-harness on the model at each step (see metrics.jsonl).", "",
             "| step | " + " | ".join(f"`{name}`" for name in names) + " |", "| ---: |" + " ---: |" * len(names)]
    lines += [f"| {row['step']:,} | " + " | ".join(f"{row['task_scores'].get(name, float('nan')):.4f}" for name in names)
              + " |" for row in rows]
    return lines + [""]


def headline(run_dir: str | Path) -> str:
    """One line for the terminal from report.json."""
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        return ""
    facts = json.loads(path.read_text())
    if "test_exact_match" in facts:
        return f"held-out test exact match {facts['test_exact_match']:.2%} (report: {Path(run_dir) / REPORT_FILE})"
    return (f"validation perplexity {facts['val_perplexity']:.3f} vs {facts['bigram_val_perplexity']:.3f} for a "
            f"Kneser-Ney bigram (report: {Path(run_dir) / REPORT_FILE})")
