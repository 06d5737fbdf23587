"""`gptlab eval MODEL --data/--text`: a model's loss, perplexity and bits per token/char/byte on a whole
data split or text file, every token scored once (sliding window), optionally beside n-gram baselines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import TokenDataset
from ..errors import GptlabError
from ..inference.loading import load_pretrained
from ..model import GPT
from ..tokenizers import Tokenizer
from .baselines import baseline_rows, ngram_scores
from .scorer import Score, resolve_window, score, signature


def describe(tokenizer: Tokenizer) -> str:
    unit = "characters" if tokenizer.name == "char" else "tokens"
    return f"{tokenizer.name}, {tokenizer.vocab_size:,} {unit}"


def check_tokenizers(model_tokenizer: Tokenizer, data_tokenizer: Tokenizer, model_name: str, data_name: str) -> None:
    if signature(model_tokenizer) != signature(data_tokenizer):
        raise GptlabError(
            f"the tokenizer of {model_name} ({describe(model_tokenizer)}) does not match the one {data_name} "
            f"was prepared with ({describe(data_tokenizer)}); evaluate on data prepared with the model's "
            "tokenizer, or pass --text FILE"
        )


@dataclass
class EvalInput:
    """A model, its tokenizer, and the token stream to score it on (with where it came from)."""

    model: GPT
    tokenizer: Tokenizer
    tokens: np.ndarray
    source: str


def load_eval_input(
    model_path: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    text: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> EvalInput:
    """Load the model and the tokens of `data`'s split or of the text file `text`, refusing mismatches."""
    if (data is None) == (text is None):
        raise GptlabError("give exactly one of --data DATA_DIR and --text FILE")
    model, tokenizer = load_pretrained(model_path, device)
    if data is not None:
        dataset = TokenDataset(data)
        check_tokenizers(tokenizer, dataset.tokenizer, str(model_path), str(data))
        return EvalInput(model, tokenizer, dataset.split(split), f"{data} ({split} split)")
    path = Path(text)
    if not path.is_file():
        raise GptlabError(f"--text {text}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GptlabError(f"--text {text}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    return EvalInput(model, tokenizer, np.asarray(tokenizer.encode(content), dtype=np.int64), str(path))


def markdown_table(rows: list[tuple[str, Score]]) -> str:
    lines = [
        "| model | loss (nats/token) | perplexity | bits/token | bits/char | bits/byte | tokens scored |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in rows:
        lines.append(
            f"| {name} | {s.loss:.4f} | {s.perplexity:.2f} | {s.bits_per_token:.4f} | {s.bits_per_char:.4f} "
            f"| {s.bits_per_byte:.4f} | {s.tokens:,} |"
        )
    return "\n".join(lines)


@dataclass
class Evaluation:
    """A model's score on one token stream, and optionally n-gram baselines' on the same tokens."""

    source: str
    context: int
    stride: int
    model: Score
    baselines: dict[int, Score]

    def rows(self, model_name: str = "this model") -> list[tuple[str, Score]]:
        return [(model_name, self.model), *(baseline_rows(self.baselines) if self.baselines else [])]

    def to_dict(self) -> dict:
        return {
            "source": self.source, "context": self.context, "stride": self.stride, "model": self.model.to_dict(),
            "baselines": {f"{order}-gram": s.to_dict() for order, s in self.baselines.items()},
        }


def evaluate_model(
    model_path: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    text: str | Path | None = None,
    stride: int | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    baseline_order: int = 0,
    progress: bool | None = None,
) -> Evaluation:
    """Score a model on a data split or a text file; with `baseline_order`, n-grams of orders 1 .. it too."""
    if baseline_order and data is None:
        raise GptlabError("--baselines needs --data DATA_DIR: the n-grams are fitted on its train split")
    loaded = load_eval_input(model_path, data=data, split=split, text=text, device=device)
    context, stride = resolve_window(loaded.model, context, stride)
    model_score = score(loaded.model, loaded.tokenizer, loaded.tokens, stride=stride, context=context,
                        batch_size=batch_size, device=device, progress=progress)
    baselines = ngram_scores(TokenDataset(data), baseline_order, split) if baseline_order else {}
    return Evaluation(loaded.source, context, stride, model_score, baselines)
