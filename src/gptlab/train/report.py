"""RUN_DIR/report.md: one page that says what a training run was and how well it did.

Written at the end of every run, next to the model it describes. A text run compares its validation
perplexity with Kneser-Ney n-grams (the bigram, and the best order up to 6) fitted on the same training
split and scored on the same tokens, and warns where the model is not clearly better than the bigram;
an adder run reports its exact-match accuracy on the held-out test problems. The headline figures also
go to `report.json`, for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..data import TokenDataset
from ..evaluate import Score, markdown_table, score, score_ngram
from ..evaluate.ngram import KneserNey, NGramCounts
from ..fileio import atomic_write_json, atomic_write_text
from ..model import GPT
from .adder import AdderDataset
from .chat_data import ChatDataset
from .labeled_data import LabeledDataset
from .run_dir import REPORT_FILE, REPORT_JSON

if TYPE_CHECKING:
    from .config import TrainConfig

# Scoring the whole validation split can take minutes for a big model on a CPU, so the report scores a
# prefix sized to about 1e12 FLOPs (2 per parameter per token, each token read twice at stride
# context/2), at most 100,000 tokens. `gptlab eval` scores the whole split.
REPORT_PARAMETER_TOKENS = 250_000_000_000
REPORT_MAX_TOKENS = 100_000
# The n-gram baselines the report fits, orders 2 to REPORT_MAX_ORDER on the training split: a few
# seconds on the complete works of Shakespeare, where a 6-gram reaches about a third of the bigram's
# perplexity (4.43 against 12.76).
REPORT_MAX_ORDER = 6
CLEARLY_BETTER = 0.8  # a perplexity at most this share of the bigram's is clearly better than it


class TrainSummary(Protocol):
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    seconds: float
    tokens_seen: int
    warning: str  # what the run warned of (a busy CPU), "" when nothing


def write_report(
    summary: TrainSummary,
    config: TrainConfig,
    model: GPT,
    dataset: TokenDataset | AdderDataset | ChatDataset | LabeledDataset,
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
        ("Final losses: the task's cross-entropy (nats per example), the validation split whole, training over "
         "`eval_iters` random batches." if isinstance(dataset, LabeledDataset) else
         "Final losses are means over `eval_iters` random batches per split (nats per target token)."),
        "",
    ]
    if isinstance(dataset, AdderDataset):
        lines += _adder_section(model, dataset, device, headline)
    elif isinstance(dataset, LabeledDataset):
        lines += _task_head_section(run_dir / "metrics.jsonl", dataset, headline)
    elif isinstance(dataset, ChatDataset):
        lines += [f"The losses are on the assistant's tokens of `{dataset.path.name}`'s conversations "
                  f"({len(dataset.split('train')):,} for training, {len(dataset.split('val')):,} held out); "
                  "the run carries the chat template (`gptlab serve`'s /v1/chat/completions, `gptlab chat`).", ""]
    else:
        lines += _text_section(model, dataset, config, device, headline, summary)
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


def _task_head_section(metrics: Path, dataset: LabeledDataset, headline: dict) -> list[str]:
    """A task head's validation accuracy (the final evaluation's) against always answering the most
    frequent class of the training split: what a classifier must beat to have learned anything."""
    rows = [row for row in map(json.loads, metrics.read_text().splitlines()) if "val_accuracy" in row]
    accuracy = rows[-1]["val_accuracy"]
    train_counts = dataset.class_counts("train")
    majority = train_counts.index(max(train_counts))
    val_counts = dataset.class_counts("val")
    baseline = val_counts[majority] / sum(val_counts)
    names = dataset.labels or tuple(f"choice {i}" for i in range(len(train_counts)))
    headline |= {"val_accuracy": accuracy, "majority_val_accuracy": baseline, "val_examples": sum(val_counts)}
    return [f"## Validation accuracy ({dataset.task})", "",
            f"**{accuracy:.2%}** of {sum(val_counts):,} held-out examples, against {baseline:.2%} for always "
            f"answering the training split's most frequent {'label' if dataset.labels else 'answer'} "
            f"(`{names[majority]}`).", ""]


def _text_section(
    model: GPT, dataset: TokenDataset, config: TrainConfig, device: torch.device | str, headline: dict,
    summary: TrainSummary,
) -> list[str]:
    val = dataset.split("val")
    n = min(len(val), REPORT_MAX_TOKENS, max(4 * config.block_size, REPORT_PARAMETER_TOKENS // model.num_parameters()))
    tokens = val[:n]
    model_score = score(model, dataset.tokenizer, tokens, device=device)
    train = dataset.split("train")
    order = min(REPORT_MAX_ORDER, len(train))
    counts = NGramCounts(train, dataset.tokenizer.vocab_size, order)
    ngrams = {k: score_ngram(KneserNey(counts, k), dataset.tokenizer, tokens) for k in range(2, order + 1)}
    best = min(ngrams, key=lambda k: ngrams[k].nll)
    headline["val_perplexity"] = model_score.perplexity
    headline["bigram_val_perplexity"] = ngrams[2].perplexity
    headline["best_ngram_order"] = best
    headline["best_ngram_val_perplexity"] = ngrams[best].perplexity
    headline["val_tokens_scored"] = model_score.tokens
    verdict = compare_with_ngrams(model_score.perplexity, ngrams[2].perplexity, best, ngrams[best].perplexity,
                                  summary.step, summary.warning)
    headline["verdict"] = verdict
    rows: list[tuple[str, Score]] = [("this model", model_score), ("bigram (Kneser-Ney)", ngrams[2])]
    if best != 2:
        rows.append((f"best n-gram of orders 2-{order}: {best}-gram (Kneser-Ney)", ngrams[best]))
    whole = "the whole validation split" if n == len(val) else f"the first {n:,} of {len(val):,} validation tokens"
    return [
        "## Validation perplexity against n-gram baselines",
        "",
        verdict,
        "",
        (f"On {whole}, every token scored once (model: sliding window, stride {max(1, config.block_size // 2)}). "
         "The n-grams are fitted on the training split; the best order is chosen on these tokens (a little "
         "optimistic). `gptlab eval RUN --data DATA --baselines` scores the whole split against more baselines."),
        "",
        markdown_table(rows),
        "",
    ]


def compare_with_ngrams(
    perplexity: float, bigram: float, best_order: int, best: float, steps: int, busy: str = ""
) -> str:
    """One paragraph: how the model compares with the bigram and with the best n-gram, and where it is
    not clearly better than the bigram, a warning and the likely why.

    Clearly better: a perplexity at most CLEARLY_BETTER times the bigram's. A character model sits near
    the bigram until its attention learns to look further back than one letter, so a model that did not
    get there has learned letter pairs and little else: too few steps (a busy or slow machine, a short
    budget) is the usual cause, and the busy-CPU warning, when there was one, says so.
    """
    ngram = f"the best n-gram ({best_order}-gram, perplexity {best:,.2f})"
    if perplexity <= CLEARLY_BETTER * bigram:
        line = (f"This model (perplexity {perplexity:,.2f}) is clearly better than the bigram ({bigram:,.2f}, "
                f"{bigram / perplexity:,.1f}x its perplexity)")
        if best_order == 2 or perplexity <= best:
            return line + (f" and better than {ngram}." if best_order != 2 else ".")
        return line + f", but not yet as good as {ngram}: a longer run, or a faster or quieter machine, gets further."
    why = f"the CPU was busy ({busy})" if busy else f"{steps:,} steps were too few for it to learn more"
    return (f"**Warning: this model (perplexity {perplexity:,.2f}) is not clearly better than the bigram "
            f"({bigram:,.2f})**, let alone {ngram}: it has learned little beyond which letter follows which. "
            f"Likely why: {why}. Train for longer (--max-time) or on a quieter machine.")


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
    if "val_accuracy" in facts:
        return (f"validation accuracy {facts['val_accuracy']:.2%} of {facts['val_examples']:,} examples vs "
                f"{facts['majority_val_accuracy']:.2%} for the most frequent class (report: {Path(run_dir) / REPORT_FILE})")
    if "test_exact_match" in facts:
        return f"held-out test exact match {facts['test_exact_match']:.2%} (report: {Path(run_dir) / REPORT_FILE})"
    if "val_perplexity" not in facts:  # a chat run: the losses, on the assistant's tokens, were printed
        return f"report: {Path(run_dir) / REPORT_FILE}"
    best = (f", {facts['best_ngram_val_perplexity']:.3f} for the best n-gram ({facts['best_ngram_order']}-gram)"
            if "best_ngram_order" in facts else "")
    line = (f"validation perplexity {facts['val_perplexity']:.3f} vs {facts['bigram_val_perplexity']:.3f} for a "
            f"Kneser-Ney bigram{best} (report: {Path(run_dir) / REPORT_FILE})")
    verdict = facts.get("verdict", "")
    return line + ("\n" + verdict.replace("**", "") if verdict.startswith("**Warning") else "")
