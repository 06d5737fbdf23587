"""The linear layer of the model: nn.Linear, with decoding's matrix-vector products on every CPU core.

Training multiplies matrices by thousands of rows and BLAS does that well. Decoding multiplies each
weight matrix by one row per sequence, where CPU BLAS falls short (see `matvec_rows`). This module holds
that one kernel choice, so that model.py stays the architecture and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS_PER_PRODUCT = 4  # above this many rows CPU BLAS's float32 product slows down by half (measured)


def row_blocks_pay(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `matvec_rows` beats `F.linear` for x @ weight^T: a large float32 weight, at most 8 rows of
    x, inference on a multi-core CPU. Training always takes F.linear."""
    if torch.compiler.is_compiling():  # a compiled graph has its own kernels; keep it free of this branch
        return False
    return (
        torch.get_num_threads() > 1 and x.numel() <= 2 * ROWS_PER_PRODUCT * x.size(-1) and weight.numel() >= 2**18
        and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
    )


def matvec_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for the few rows of a decoding step, with every CPU core reading the weights.

    Decoding multiplies each weight matrix by one row per sequence, so a step costs one read of all the
    weights and little else. CPU BLAS runs a float32 matrix-vector product on a single thread, i.e. at
    one core's memory bandwidth. Cutting the matrix into one block of rows per thread and multiplying
    the blocks as a batch lets torch give each thread its block: on a 2-core CPU this reads GPT-2's
    weights about 2.3x faster. More than ROWS_PER_PRODUCT rows go through in groups of that many, which
    reads the weights once per group and is still faster. The numbers are F.linear's up to rounding.
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


class Linear(nn.Linear):
    """nn.Linear (the same parameters and numbers) whose decoding steps read the weights on every core."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if row_blocks_pay(x, self.weight):
            return matvec_rows(x, self.weight, self.bias)
        return super().forward(x)
