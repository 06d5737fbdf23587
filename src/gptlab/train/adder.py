"""The adder task: a GPT learns two-digit addition, `15+57=072`, and is graded by exact match.

Every pair of numbers 00..99 is one example (10,000 in all), the answer always three digits so every
example has the same length and the answer starts at the same position. A fixed shuffle splits them
into train / validation / test, so the test set is the same held-out set for every run, whatever its
training seed. `AdderDataset` has `TokenDataset`'s batching interface, so the training loop trains
on it unchanged; its targets are -100 except on the answer digits, so the loss is the answer's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GptlabError
from ..inference import generate
from ..model import GPT
from ..tokenizers import CharTokenizer

VOCAB = list("0123456789+=")
PROMPT_LENGTH = 6  # "15+57="
ANSWER_LENGTH = 3  # "072"
EXAMPLE_LENGTH = PROMPT_LENGTH + ANSWER_LENGTH
CONTEXT = EXAMPLE_LENGTH - 1  # the model never needs to read the last answer digit
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SPLIT_SEED = 0  # fixed, so every run is graded on the same held-out problems
IGNORE = -100  # the target value cross-entropy skips


def format_example(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}={a + b:03d}"


def all_examples() -> list[str]:
    return [format_example(a, b) for a in range(100) for b in range(100)]


@dataclass
class AdderScore:
    correct: int
    total: int
    mistakes: list[tuple[str, str]]  # (prompt + expected answer, the model's answer), a few of them

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


class AdderDataset:
    """The 10,000 addition problems as (n, 9) token arrays per split."""

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer(VOCAB)
        examples = np.array([self.tokenizer.encode(e) for e in all_examples()], dtype=np.int64)  # (10000, 9)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
        n_train = int(SPLIT_FRACTIONS["train"] * len(examples))
        n_val = int(SPLIT_FRACTIONS["val"] * len(examples))
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(examples))}
        self._splits = {name: examples[np.sort(order[lo:hi])] for name, (lo, hi) in bounds.items()}

    def split(self, name: str) -> np.ndarray:
        if name not in self._splits:
            raise GptlabError(f"unknown split {name!r} of the adder task; expected train, val or test")
        return self._splits[name]

    def check_length(self, split: str, block_size: int) -> np.ndarray:
        """The split, if `block_size` can hold a problem and the first two answer digits."""
        if block_size < CONTEXT:
            raise GptlabError(f"the adder task needs --block-size of at least {CONTEXT}, got {block_size}")
        return self.split(split)

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, *,
        rows: slice | None = None, pin_memory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random problems: x is (batch_size, 8), y is x shifted left with only the answer kept.

        The windows are 8 tokens whatever `block_size` is: one problem per row, nothing to pad. As
        TokenDataset's: all `batch_size` draws are made, `rows` picks this process's, `pin_memory`
        page-locks them.
        """
        data = self.check_length(split, block_size)
        picked = rng.integers(0, len(data), size=batch_size)  # (B,)
        problems = data[picked if rows is None else picked[rows]]  # (B, 9)
        x = torch.from_numpy(problems[:, :-1].copy())  # (B, 8)
        y = torch.from_numpy(problems[:, 1:].copy())  # (B, 8)
        y[:, : PROMPT_LENGTH - 1] = IGNORE  # y[:, 5:] are the three answer digits
        return (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)

    @torch.no_grad()
    def exact_match(
        self, model: GPT, split: str = "test", device: torch.device | str = "cpu", batch_size: int = 1000
    ) -> AdderScore:
        """Greedy-decode three digits after each prompt; a problem counts only if all three are right."""
        data = self.split(split)
        correct, mistakes = 0, []
        for start in range(0, len(data), batch_size):
            rows = data[start : start + batch_size]
            prompts = torch.from_numpy(rows[:, :PROMPT_LENGTH].copy()).to(device)  # (B, 6)
            out = generate(model, prompts, ANSWER_LENGTH, temperature=0.0)[:, PROMPT_LENGTH:].cpu().numpy()
            right = (out == rows[:, PROMPT_LENGTH:]).all(axis=1)  # (B,)
            correct += int(right.sum())
            for i in np.flatnonzero(~right)[: max(0, 5 - len(mistakes))]:
                mistakes.append((self.tokenizer.decode(rows[i]), self.tokenizer.decode(out[i])))
        return AdderScore(correct, len(data), mistakes)
