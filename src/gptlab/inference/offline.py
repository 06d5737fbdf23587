"""The library's ways to generate, each a private engine run to the end: `generate` (ids in, ids out,
as nanoGPT's `GPT.generate` did), `complete` (a batch of prompts to finished `Completion`s) and `TextStream` (one
prompt's text as it arrives). `gptlab sample` uses `TextStream`; `gptlab serve` shares one engine
between all its clients."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ..model import GPT
from .engine import Engine, Sequence
from .params import SamplingParams
from .sampler import TokenLogprobs


@dataclass
class Completion:
    text: str  # the generated text only, without the prompt, the eos token or the stop string
    token_ids: list[int]  # every generated id, including the eos or the tokens that spelled the stop string
    finish_reason: str  # "stop" (eos, a stop id or a stop string) or "length" (max_new_tokens reached)
    prompt_tokens: int
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, with params.logprobs
    prompt_logprobs: list[TokenLogprobs] | None = None  # one per window token, with params.prompt_logprobs


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + max_new_tokens), with no stop condition but the length.

    Every row draws from `generator` (in row order), or from torch's global RNG when it is None.
    """
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_at_eos=False)
    engine = Engine(model, max_batch=max(idx.size(0), 1), use_cache=use_cache, prefill_tokens=None)
    rows = _submit_all(engine, idx.tolist(), params, generator)
    engine.run()
    _raise_failure(rows)
    out = torch.tensor([row.token_ids for row in rows], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, out.reshape(idx.size(0), max_new_tokens)], dim=1)


def complete(model: GPT, tokenizer, prompts: Seq[Seq[int]], params: SamplingParams) -> list[Completion]:
    """Continue every prompt in one batch; each row's tokens are those it would get alone."""
    engine = Engine(model, tokenizer, max_batch=max(len(prompts), 1), prefill_tokens=None)
    rows = _submit_all(engine, prompts, params)
    engine.run()
    _raise_failure(rows)
    return [completion_of(row) for row in rows]


def completion_of(row: Sequence) -> Completion:
    return Completion(row.text_so_far, row.token_ids, row.finish_reason, len(row.prompt), row.logprobs,
                      row.prompt_logprobs)


class TextStream:
    """Iterate to receive the decoded text of one prompt's continuation piece by piece, as it arrives.

    A piece is always whole characters (bytes of a character split across tokens wait for the rest)
    and never part of a possible stop string. Once exhausted, `finish_reason` is "stop" or "length";
    `close()` ends generation early and leaves it None.
    """

    def __init__(self, model: GPT, tokenizer, prompt_ids: Seq[int], params: SamplingParams) -> None:
        self._engine = Engine(model, tokenizer, max_batch=1)
        self._row = _submit_all(self._engine, [prompt_ids], params)[0]
        self._sent = 0
        self.prompt_tokens = len(prompt_ids)

    @property
    def finish_reason(self) -> str | None:
        return self._row.finish_reason

    @property
    def completion_tokens(self) -> int:
        return len(self._row.token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self._row.token_ids

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        row = self._row
        while self._sent == len(row.pieces):
            if row.done:
                _raise_failure([row])
                raise StopIteration
            self._engine.step()
        self._sent += 1
        return row.pieces[self._sent - 1]

    def close(self) -> None:
        self._engine.cancel(self._row)


def _submit_all(engine: Engine, prompts: Seq[Seq[int]], params: SamplingParams,
                generator: torch.Generator | None = None) -> list[Sequence]:
    """Check every prompt before any is queued, so that a bad one is refused before work starts."""
    if not prompts:
        raise ValueError("no prompts: pass at least one list of token ids")
    for i, prompt in enumerate(prompts):
        engine.check(prompt, params, name=f"prompt {i}")
    return [engine.submit(prompt, params, generator=generator) for prompt in prompts]


def _raise_failure(rows: list[Sequence]) -> None:
    failed = next((row.error for row in rows if row.error is not None), None)
    if failed is not None:
        raise failed
