"""What to generate: one request's sampling parameters, checked before anything runs.

The fields and their ranges follow OpenAI's completions API where it has them (presence and frequency
penalties in [-2, 2], logit biases in [-100, 100]) and vLLM's where it goes further (top-k,
repetition penalty, min_tokens, stop token ids, up to 20 logprobs). Values that are in range but
extreme (a temperature of 1e-45, a top-p of 5e-324) are valid: the sampler keeps every step finite.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # the most alternatives per position a request may ask for, as vLLM's default


def _param(default: object, help: str, metavar: str | None = None) -> object:
    """A field whose metadata is its help line (`gptlab sample` generates its options from them)."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass
class SamplingParams:
    """How to continue a prompt. `validate()` raises ValueError naming the first invalid field."""

    max_new_tokens: int = _param(128, "tokens to generate")
    temperature: float = _param(1.0, "softmax temperature; 0 is greedy")
    top_k: int | None = _param(None, "sample only among the k most likely tokens")
    top_p: float | None = _param(None, "sample only within the nucleus of this mass (the smallest set of "
                                       "tokens whose probabilities reach it)")
    repetition_penalty: float = _param(1.0, "divide the logits of tokens already seen (prompt or output) by "
                                            "this (CTRL); 1 is none")
    presence_penalty: float = _param(0.0, "subtracted once from the logit of every token already generated")
    frequency_penalty: float = _param(0.0, "subtracted from a token's logit once per time it was generated")
    logit_bias: Mapping[int, float] | None = _param(None, "token id -> added to its logit before sampling")
    seed: int | None = _param(None, "random seed, for reproducible samples: same seed, same text on every run "
                                    "and in any batch (None: torch's global generator)")
    stop: tuple[str, ...] = _param((), "stop when the text contains TEXT (left out of the output); repeat "
                                       "for several", metavar="TEXT")
    stop_at_eos: bool = _param(True, "stop at the tokenizer's eos_id when it has one")
    stop_token_ids: tuple[int, ...] = _param((), "more ids that end the text like eos (left out of it)")
    min_tokens: int = _param(0, "eos and stop_token_ids cannot end the text before this many tokens")
    logprobs: int | None = _param(None, "per generated token: its log-probability and the N most likely")
    prompt_logprobs: int | None = _param(None, "the same for every prompt token after the first")

    def validate(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None), got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is none), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
                if not _is_real(bias) or not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) (or None), got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (or None), got {value!r}")

    def check_ids(self, vocab_size: int) -> None:
        """The token ids the parameters name must exist in the model's vocabulary."""
        named = [("logit_bias", t) for t in (self.logit_bias or {})]
        named += [("stop_token_ids", t) for t in self.stop_token_ids]
        for name, token in named:
            if token >= vocab_size:
                raise ValueError(f"{name} names token {token}, outside the vocabulary of {vocab_size}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
