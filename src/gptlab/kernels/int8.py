"""int8 weights: the product of float rows with an int8 weight and its per-row scales, as chooser candidates.

Weight-only int8 decoding (per-output-channel scales, float activations) through torch's int8
weight-packed product, by dequantizing (the plain path), or, for a layer that offers one, through a
float copy of the dequantized weight kept beside the int8 one: the float model's own product, so that
int8 is never slower than float where torch's int8 kernels lose to it (they are arithmetic-bound on
some CPUs). The copy is freed again wherever the measurement prefers another path, so it costs memory
only where it is the fastest. `gptlab.quantize` turns a model's layers into ones that compute through
`int8_linear`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import chooser
from .chooser import bucket, synchronized
from .products import DECODE_ROWS, from_memory, linear

KEPT = "float copy kept"


class FloatCopy:
    """A layer's dequantized weight in its activations' dtype, made on first use and dropped as soon as no
    shape's measured choice uses it."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self._users: set[tuple] = set()  # the chooser keys that chose this copy

    def matrix(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        value = self.value
        if value is None or value.dtype != dtype or value.device != weight.device:
            value = self.value = dequantized(weight, scales, dtype)
        return value

    def settle(self, key: tuple, chosen: bool) -> None:
        """Record whether `key`'s choice uses the copy; free it when no choice does."""
        if chosen:
            self._users.add(key)
            return
        self._users.discard(key)
        if not self._users:
            self.value = None


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    float_copy: FloatCopy | None = None,
) -> torch.Tensor:
    """x @ (scales[:, None] * weight)^T + bias for an int8 `weight`, through the fastest available product;
    with `float_copy` (the layer's), the float product on a kept dequantized weight is a candidate too."""
    flat = x.reshape(-1, x.size(-1))  # (R, in)
    path = int8_path(flat, weight, scales, float_copy)
    if path == KEPT:
        y = linear(flat, float_copy.matrix(weight, scales, flat.dtype))  # (R, out)
    else:
        y = INT8_PRODUCTS[path](flat, weight, scales)  # (R, out)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.size(0))


def int8_path(flat: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, float_copy: FloatCopy | None) -> str:
    """The product `int8_linear` takes for (R, in) rows `flat`: pinned, plain, or measured once per shape."""
    pinned = chooser.forced("int8")
    key = None
    if pinned is None and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
        rows = flat.size(0)
        decode = rows <= DECODE_ROWS
        key = ("int8 linear", bucket(rows), *weight.shape, str(flat.dtype), str(weight.device),
               torch.get_num_threads(), *(["weights from memory", "rows bucketed"] if decode else []),
               *([KEPT] if float_copy is not None else []))
        path = chooser.known(key)  # a decoding step's every layer: answered before any candidate is built
        if path is None:
            path = _measured_path(key, flat, weight, scales, float_copy, decode)
    else:
        names = _available(flat, weight, float_copy)
        path = pinned if pinned in names else "dequantized"
    if float_copy is not None:
        float_copy.settle(key or ("forced or plain",), path == KEPT)
    return path


def _available(flat: torch.Tensor, weight: torch.Tensor, float_copy: FloatCopy | None) -> tuple[str, ...]:
    """The products to measure; where a float copy may be kept, dequantizing on every call is not among
    them: it is the copy's own product plus the dequantization (a 150-ms candidate for GPT-2's head)."""
    products = tuple(int8_products(flat, weight))
    if float_copy is None:
        return products
    return (*(name for name in products if name != "dequantized"), KEPT)


def _measured_path(key: tuple, flat: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                   float_copy: FloatCopy | None, decode: bool) -> str:
    names = _available(flat, weight, float_copy)
    if len(names) == 1:
        return names[0]

    def build(name: str) -> Callable[[], object]:
        if name == KEPT:  # copies of the float matrix, as the float model's own product would read it;
            # timed through F.linear: `linear` would measure its own candidates inside this measurement
            kept = float_copy.matrix(weight, scales, flat.dtype)
            mats = itertools.cycle(from_memory(kept)) if decode else itertools.repeat(kept)
            return synchronized(lambda: F.linear(flat, next(mats)), flat.device)
        weights = itertools.cycle(from_memory(weight)) if decode else itertools.repeat(weight)
        product = INT8_PRODUCTS[name]
        return synchronized(lambda: product(flat, next(weights), scales), flat.device)

    return chooser.fastest(key, names, build, plain="dequantized")


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


def dequantized(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scales.to(dtype)[:, None]


def dequantized_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantized(weight, scales, x.dtype))


def packed_int8_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales.to(x.dtype))


def packed_int8_product_in_bf16(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return packed_int8_product(x.to(torch.bfloat16), weight, scales).to(x.dtype)


INT8_PRODUCTS: dict[str, Callable[..., torch.Tensor]] = {
    "dequantized": dequantized_product, "int8 kernel": packed_int8_product,
    "int8 kernel, bf16 rows": packed_int8_product_in_bf16,
}
chooser.CANDIDATES["int8"] = (*INT8_PRODUCTS, KEPT)
