"""Attention: torch's fused kernel, or the textbook softmax(Q K^T / sqrt(d) + M) V, whichever runs faster.

The textbook formula's two products run at the matmul rate (torch's fused CPU kernel gains little from
bf16). With autograd on, forward and backward are timed together. The textbook formula keeps its
(T, S) weights for the backward pass, so it is a candidate only while they are small (TEXTBOOK_SCORES).
The fused kernel is the plain path.

A decoding step's attention is small (one query per row against S cached keys: 12 heads x 150 keys
x 64 is 0.1 MFLOP), yet on a CPU with more than one thread torch's fused kernel opens a parallel
region for it, and every thread must be scheduled before the region ends. On a shared 2-core AMD EPYC
with another program running, that cost 8 ms a call at two threads against 0.035 ms at one (12
layers: a third of a GPT-2 124M step). So, without autograd and with several threads, the fused
kernel on one thread is a candidate too: measured, like the others, where it runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import chooser
from .chooser import bucket, dtype_named, synchronized

TEXTBOOK_SCORES = 2**24  # the textbook attention is a candidate while B * nh * T * S is at most this


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M) v for q (B, nh, T, hs) and k, v (B, nh, S, hs).

    `mask` is a bool tensor broadcastable to (B, nh, T, S), True where a query may attend; None means
    causal with the queries at the end of the keys (query t sees keys 0 .. S - T + t).
    """
    key = attention_key(q, k, mask, dropout_p)
    path = chooser.forced("attention") or (
        _compiled_attention_path(key) if torch.compiler.is_compiling() else chooser.known(key) or attention_path(key)
    )
    return ATTENTION_PATHS[path](q, k, v, mask, dropout_p)


def attention_key(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> tuple:
    """What the attention choice depends on: shapes (lengths rounded up to a power of two), dtype,
    device, whether autograd is on, the mask's leading shape, whether dropout runs and the thread count."""
    B, nh, T, hs = q.shape
    S = k.size(-2)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    mask_shape = None if mask is None else tuple(int(d) for d in mask.shape[:-2])
    T, S = (1, bucket(S)) if T == 1 else (bucket(T), bucket(T) if T == S else bucket(S))
    # a compiled graph does not set torch's thread count: it is offered no one-thread path (threads 1)
    threads = 1 if torch.compiler.is_compiling() else torch.get_num_threads()
    return ("attention", B, nh, T, S, hs, str(q.dtype), str(q.device), grad, mask_shape, dropout_p > 0, threads)


def attention_path(key: tuple) -> str:
    """The faster of ATTENTION_PATHS for `attention_key`'s key on this machine (measured once)."""
    _, B, nh, T, S, hs, dtype, device, grad, mask_shape, dropout, threads = key
    paths = tuple(name for name in ATTENTION_PATHS if (name != "textbook" or B * nh * T * S <= TEXTBOOK_SCORES)
                  and (name != ONE_THREAD or (threads > 1 and not grad and device == "cpu")))
    if len(paths) == 1:
        return paths[0]

    @functools.cache
    def inputs() -> tuple:
        """q, k, v, the gradient, mask and dropout a candidate is timed on: made once, shared by all."""
        generator = torch.Generator().manual_seed(0)
        dt, where = dtype_named(dtype), torch.device(device)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(where, dt).requires_grad_(grad)

        q, k, v = randn(B, nh, T, hs), randn(B, nh, S, hs), randn(B, nh, S, hs)
        grad_out = torch.randn(B, nh, T, hs, generator=generator).to(where, dt)
        mask = None if mask_shape is None else torch.ones(*mask_shape, T, S, dtype=torch.bool, device=where)
        return q, k, v, grad_out, mask, 0.1 if dropout else 0.0

    def build(path: str) -> Callable[[], object]:
        q, k, v, grad_out, mask, p = inputs()

        def once() -> object:
            y = ATTENTION_PATHS[path](q, k, v, mask, p)
            return torch.autograd.grad(y, (q, k, v), grad_out) if grad else y

        return synchronized(once, torch.device(device))

    return chooser.fastest(key, paths, build, plain="fused")


@torch.compiler.assume_constant_result
def _compiled_attention_path(key: tuple) -> str:
    """`attention_path`, run eagerly while torch.compile traces: the graph gets its answer as a constant."""
    return attention_path(key)


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """torch's scaled_dot_product_attention, which picks its own kernel (flash, memory-efficient, math)."""
    T, S = q.size(-2), k.size(-2)
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)


def one_thread_fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """`fused_attention` with torch held to one thread for the call (setting the count costs 0.1 us)."""
    threads = torch.get_num_threads()
    if threads == 1:
        return fused_attention(q, k, v, mask, dropout_p)
    torch.set_num_threads(1)
    try:
        return fused_attention(q, k, v, mask, dropout_p)
    finally:
        torch.set_num_threads(threads)


def textbook_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head) + M) V, M = -inf where a query may not attend, as two batched products."""
    B, nh, T, hs = q.shape
    S = k.size(-2)
    if mask is None and T == S:
        return textbook_causal_attention(q, k, v, dropout_p)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, S)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return weights @ v  # (B, nh, T, hs)


def textbook_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head) + M) V with M = -inf above the diagonal, for T queries and T keys."""
    B, nh, T, hs = q.shape
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))  # (B*nh, T, hs): 3-D products run fastest
    mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)  # (T, T): M
    # one batched product scales and adds M: no separate passes over the scores
    scores = torch.baddbmm(mask.expand(B * nh, T, T), q, k.transpose(1, 2), alpha=1.0 / math.sqrt(hs))
    weights = F.softmax(scores, dim=-1)  # (B*nh, T, T), each row sums to 1
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return (weights @ v).view(B, nh, T, hs)


ONE_THREAD = "fused, one thread"
ATTENTION_PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "fused": fused_attention, "textbook": textbook_attention, ONE_THREAD: one_thread_fused_attention,
}
chooser.CANDIDATES["attention"] = tuple(ATTENTION_PATHS)
