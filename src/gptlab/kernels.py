"""The fast paths behind the model's plain operations: linear layers, attention, GELU.

model.py says what GPT-2 computes; this module decides how, on the device at hand. Each function here
computes exactly the textbook operation (up to float rounding, tested against the plain torch call)
and picks among equivalent ways of doing it:

- `linear`: decoding multiplies each weight matrix by one row per sequence, where CPU BLAS runs a
  float32 matrix-vector product on one thread; `matvec_rows` spreads the rows of the weight over every
  thread instead. The vocabulary head of a few rows runs as W @ h^T, a tall, skinny product BLAS does
  well. Training and large batches take `F.linear`.
- `attention`: torch's fused kernel, or the textbook softmax(Q K^T / sqrt(d) + M) V, which runs at the
  bf16 matmul rate on a CPU where the fused kernel gains nothing from bf16.
- `gelu`: torch's tanh GELU kernel in eager mode; in a compiled graph the same function written as
  x * sigmoid(2u), which inductor fuses into one loop on exp (several times faster than tanh on a CPU).

`force(attention=...)` pins a choice, for tests and for tools (such as FLOP counters) that must see
the products rather than one fused kernel.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS_PER_PRODUCT = 4  # above this many rows CPU BLAS's float32 product slows down by half (measured)
ATTENTION_PATHS = ("fused", "textbook")
_forced: dict[str, str] = {}


@contextlib.contextmanager
def force(*, attention: str) -> Iterator[None]:
    """Use one attention path ("fused" or "textbook") inside the block, whatever the device prefers."""
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
    previous = _forced.get("attention")
    _forced["attention"] = attention
    try:
        yield
    finally:
        if previous is None:
            _forced.pop("attention")
        else:
            _forced["attention"] = previous


# --- linear layers -----------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias, through whichever product is fastest for this shape."""
    if row_blocks_pay(x, weight):
        return matvec_rows(x, weight, bias)
    if tall_product_pays(x, weight):
        y = torch.mm(weight, x.t()).t()  # (R, out)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and numbers) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def row_blocks_pay(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `matvec_rows` beats `F.linear` for x @ weight^T: a large float32 weight, at most 8 rows of
    x, inference on a multi-core CPU. Training always takes F.linear."""
    if torch.compiler.is_compiling():  # a compiled graph has its own kernels; keep it free of this branch
        return False
    return (
        torch.get_num_threads() > 1 and x.numel() <= 2 * ROWS_PER_PRODUCT * x.size(-1) and weight.numel() >= 2**18
        and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
    )


def tall_product_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether W @ x^T beats x @ W^T: a few rows through a matrix much taller than wide (the vocabulary
    head), at inference. CPU BLAS runs this orientation of the tall, skinny product faster."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    return x.dim() == 2 and x.size(0) <= 64 and weight.size(0) >= 16 * weight.size(1)


def matvec_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for the few rows of a decoding step, with every CPU core reading the weights.

    Decoding multiplies each weight matrix by one row per sequence, so a step costs one read of all the
    weights and little else. CPU BLAS runs a float32 matrix-vector product on a single thread, i.e. at
    one core's memory bandwidth. Cutting the matrix into one block of rows per thread and multiplying
    the blocks as a batch lets torch give each thread its block. More than ROWS_PER_PRODUCT rows go
    through in groups of that many, which reads the weights once per group.
    """
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)  # (R, in)
    groups = [_row_block_product(rows, weight) for rows in flat.split(ROWS_PER_PRODUCT)]
    y = groups[0] if len(groups) == 1 else torch.cat(groups)  # (R, out)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


def _row_block_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(R, in) @ (out, in)^T with the weight's rows cut into one block per thread."""
    threads = torch.get_num_threads()
    (rows, in_features), out_features = x.shape, weight.size(0)
    split = out_features - out_features % threads  # the rows of `weight` that divide evenly
    blocks = weight[:split].view(threads, split // threads, in_features)  # (threads, out/threads, in)
    y = torch.bmm(blocks, x.t().expand(threads, in_features, rows))  # (threads, out/threads, R)
    y = y.reshape(split, rows).t()  # (R, split)
    if split < out_features:
        y = torch.cat([y, F.linear(x, weight[split:])], dim=1)  # (R, out)
    return y


# --- attention ---------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M) v for q (B, nh, T, hs) and k, v (B, nh, S, hs).

    `mask` is a bool tensor broadcastable to (B, nh, T, S), True where a query may attend; None means
    causal with the queries at the end of the keys (query t sees keys 0 .. S - T + t).
    """
    T, S = q.size(-2), k.size(-2)
    if mask is None and T == S and attention_path(q) == "textbook":
        return textbook_causal_attention(q, k, v, dropout_p)
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)


def attention_path(q: torch.Tensor) -> str:
    """The faster way to attend: the textbook formula for bf16 on a CPU, the fused kernel elsewhere.

    That kernel gains nothing from bf16 on a CPU (its backward runs slower than in float32), while the
    formula's two products run at the bf16 matmul rate. In float32 the two are within a few percent of
    each other, and the fused kernel needs far less memory.
    """
    if "attention" in _forced:
        return _forced["attention"]
    return "textbook" if q.dtype == torch.bfloat16 and q.device.type == "cpu" else "fused"


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


# --- GELU --------------------------------------------------------------------------------------


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, x * (1 + tanh(u)) / 2 with u = sqrt(2/pi) * (x + 0.044715 x^3).

    Since (1 + tanh(u)) / 2 = sigmoid(2u), a compiled graph gets the sigmoid form; eager mode keeps
    torch's single GELU kernel, which beats the several passes the sigmoid form takes there.
    """
    if torch.compiler.is_compiling():
        return sigmoid_form_gelu(x)
    return F.gelu(x, approximate="tanh")


def sigmoid_form_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU as x * sigmoid(2u); 2u = x * (a + b x^2)."""
    return x * torch.sigmoid(x * (_GELU_LINEAR + _GELU_CUBIC * x * x))


_GELU_LINEAR = 2 * math.sqrt(2 / math.pi)
_GELU_CUBIC = _GELU_LINEAR * 0.044715
