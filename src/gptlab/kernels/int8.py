"""int8 weights: the product of float rows with an int8 weight and its per-row scales, as chooser candidates.

Weight-only int8 decoding (per-output-channel scales, float activations) through torch's int8
weight-packed product, or by dequantizing (the plain path). `gptlab.quantize` turns a model's layers
into ones that compute through `int8_linear`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import chooser
from .chooser import bucket, synchronized
from .products import DECODE_ROWS, from_memory


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (scales[:, None] * weight)^T + bias for an int8 `weight`, through the fastest available product."""
    flat = x.reshape(-1, x.size(-1))  # (R, in)
    products = int8_products(flat, weight)
    pinned = chooser.forced("int8")
    if pinned in products:
        path = pinned
    elif len(products) == 1 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        path = "dequantized"
    else:
        rows = flat.size(0)
        decode = rows <= DECODE_ROWS
        key = ("int8 linear", bucket(rows), *weight.shape, str(x.dtype), str(weight.device),
               torch.get_num_threads(), *(["weights from memory", "rows bucketed"] if decode else []))

        weights = functools.cache(lambda: itertools.cycle(from_memory(weight)) if decode else itertools.repeat(weight))

        def build(name: str) -> Callable[[], object]:
            product = products[name]
            return synchronized(lambda: product(flat, next(weights()), scales), x.device)

        path = chooser.fastest(key, tuple(products), build, plain="dequantized")
    y = products[path](flat, weight, scales)  # (R, out)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.size(0))


def int8_products(x: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[..., torch.Tensor]]:
    """The ways to multiply (R, in) float rows by an int8 weight here.

    torch's int8 weight-packed product (`aten._weight_int8pack_mm`) runs on CPUs; measured on an
    AVX-512 CPU its bfloat16 and float16 paths are vectorised and its float32 path is several times
    slower, so float32 rows may also go through it in bfloat16 (rounding the activations to bf16's 8
    significant bits). Its reduced-precision paths need `in` to be a multiple of 16 (other widths
    read out of bounds). Dequantizing into a float matrix and calling F.linear always works.
    """
    products: dict[str, Callable[..., torch.Tensor]] = {"dequantized": dequantized_product}
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not _int8_kernel():
        return products
    width_ok = x.size(-1) % 16 == 0
    if x.dtype == torch.float32 or width_ok:
        products["int8 kernel"] = packed_int8_product
    if x.dtype == torch.float32 and width_ok:
        products["int8 kernel, bf16 rows"] = packed_int8_product_in_bf16
    return products


@functools.cache
def _int8_kernel() -> bool:
    """Whether this torch build has the int8 weight-packed product (it runs on every CPU that has it:
    unlike oneDNN's bf16 reorder it needs no instruction set beyond the baseline; the chooser's guard
    covers the rest)."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def dequantized_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype) * scales.to(x.dtype)[:, None])


def packed_int8_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales.to(x.dtype))


def packed_int8_product_in_bf16(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return packed_int8_product(x.to(torch.bfloat16), weight, scales).to(x.dtype)


chooser.CANDIDATES["int8"] = ("dequantized", "int8 kernel", "int8 kernel, bf16 rows")
