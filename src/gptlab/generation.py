"""Sampling from a trained GPT: next-token distributions, decoding loops and text streaming."""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def validate_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask to -inf every token outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p; the top token always stays
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) logits of the last position -> (B, 1) chosen token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, T) -> (B, T + max_new_tokens), feeding at most the last block_size tokens back in."""
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    for token in iter_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator):
        idx = torch.cat([idx, token], dim=1)
    return idx


def iter_tokens(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    """Yield each new (B, 1) token as soon as it is chosen."""
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                context = idx[:, -block_size:]  # (B, <=block_size)
                logits = model(context).logits[:, -1, :]  # (B, V)
                token = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
                idx = torch.cat([idx, token], dim=1)
                yield token
    finally:
        model.train(was_training)


def stream_text(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Yield decoded text as tokens arrive; bytes of a split UTF-8 character wait for the rest."""
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in iter_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator):
        piece = decoder.decode(tokenizer.decode_bytes([int(token[0, 0])]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
