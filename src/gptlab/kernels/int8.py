"""int8 weights: the product of float rows with an int8 weight and its per-row scales, as chooser candidates.

Weight-only int8 decoding (per-output-channel scales, float activations) through torch's int8
weight-packed product, by dequantizing (the plain path), or, for a layer that offers one, through a
float copy of the dequantized weight kept beside the int8 one: the float model's own product, so that
a layer's int8 product is never slower than its float one where torch's int8 kernels lose to it (they
are arithmetic-bound on some CPUs), or, where the CPU has bf16 instructions, through a bf16 copy in
oneDNN's layout (half float32's bytes, read at the memory's rate), or, for float32 rows on a CPU whose
quantized engine is fbgemm's, through fbgemm's packed int8 product with the activations quantized on the
fly (`fbgemm_dynamic_product`: int8 times int8, the way `torch.ao`'s dynamic quantization runs, from a
copy of the int8 weight packed for it). A copy is freed again wherever the
measurement prefers another path, so it costs memory only where it is the fastest. Dequantizing on
every call is measured only for layers without a copy (it is the copy's product plus the work).
`gptlab.quantize` turns a model's layers into ones that compute through `int8_linear`, and checks the
whole decoding step against the float weights.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import chooser
from .chooser import bucket, synchronized
from .products import DECODE_ROWS, _onednn_prepacks, fbgemm_engine, from_memory, linear

KEPT = "float copy kept"
KEPT_BF16 = "bf16 copy kept, prepacked"
FBGEMM = "fbgemm dynamic int8"


class FloatCopy:
    """A layer's dequantized weight, kept in the activations' dtype (KEPT) or as oneDNN's reordered bf16
    matrix (KEPT_BF16), or its int8 weight packed for fbgemm (FBGEMM), made on first use and dropped as
    soon as no shape's measured choice uses it."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor | Packed] = {}  # candidate -> its matrix
        self._users: dict[tuple, str] = {}  # chooser key -> the kept candidate its choice is
        self.last_decoding: str | None = None  # the product the layer's last decoding call took (what it read)

    @property
    def value(self) -> torch.Tensor | None:
        """The kept matrix, if one is kept (None: every choice multiplies the int8 weight itself)."""
        return next(iter(self.values.values()), None)

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.values.values())

    def kept_bytes(self, name: str | None) -> int:
        """The bytes of the copy candidate `name` reads (0 where none is kept for it)."""
        value = self.values.get(name)
        return 0 if value is None else value.nbytes

    def matrix(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in `dtype` (KEPT's matrix)."""
        value = self.values.get(KEPT)
        if value is None or value.dtype != dtype or value.device != weight.device:
            value = self.values[KEPT] = dequantized(weight, scales, dtype)
        return value

    def reordered_bf16(self, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The dequantized weight in bf16, reordered once for oneDNN (KEPT_BF16's matrix: 2 bytes a weight)."""
        value = self.values.get(KEPT_BF16)
        if value is None or value.device != weight.device:
            value = self.values[KEPT_BF16] = _reordered(dequantized(weight, scales, torch.bfloat16))
        return value

    def packed_int8(self, weight: torch.Tensor, scales: torch.Tensor) -> Packed:
        """The int8 weight packed for fbgemm with its per-row scales (FBGEMM's copy: about 1 byte a weight)."""
        value = self.values.get(FBGEMM)
        if value is None:
            value = self.values[FBGEMM] = packed_for_fbgemm(weight, scales)
        return value

    def settle(self, key: tuple, chosen: str) -> None:
        """Record which candidate `key`'s choice is; free each kept matrix no choice uses."""
        if chosen in (KEPT, KEPT_BF16, FBGEMM):
            self._users[key] = chosen
        else:
            self._users.pop(key, None)
        for name in [n for n in self.values if n not in self._users.values()]:
            del self.values[name]


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
    elif path == KEPT_BF16:
        y = bf16_prepacked_product(flat, float_copy.reordered_bf16(weight, scales))  # (R, out)
    elif path == FBGEMM:
        y = fbgemm_dynamic_product(flat, float_copy.packed_int8(weight, scales))  # (R, out)
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
               *([KEPT] if float_copy is not None else []), *([KEPT_BF16] if _offers_bf16(flat, float_copy) else []),
               *([FBGEMM] if _offers_fbgemm(flat, float_copy) else []))
        path = chooser.known(key)  # a decoding step's every layer: answered before any candidate is built
        if path is None:
            path = _measured_path(key, flat, weight, scales, float_copy, decode)
    else:
        names = _available(flat, weight, float_copy)
        path = pinned if pinned in names else "dequantized"
    if float_copy is not None:
        float_copy.settle(key or ("forced or plain",), path)
        if flat.size(0) <= DECODE_ROWS:
            float_copy.last_decoding = path
    return path


def _available(flat: torch.Tensor, weight: torch.Tensor, float_copy: FloatCopy | None) -> tuple[str, ...]:
    """The products to measure; where a float copy may be kept, dequantizing on every call is not among
    them: it is the copy's own product plus the dequantization (a 150-ms candidate for GPT-2's head)."""
    products = tuple(int8_products(flat, weight))
    if float_copy is None:
        return products
    bf16 = [KEPT_BF16] if _offers_bf16(flat, float_copy) else []
    fbgemm = [FBGEMM] if _offers_fbgemm(flat, float_copy) else []
    return (*(name for name in products if name != "dequantized"), KEPT, *bf16, *fbgemm)


def _offers_bf16(flat: torch.Tensor, float_copy: FloatCopy | None) -> bool:
    """Whether KEPT_BF16 is a candidate: float32 rows on a CPU whose oneDNN runs bf16 (not on AVX2 alone)."""
    return (float_copy is not None and flat.dtype == torch.float32 and flat.device.type == "cpu"
            and _onednn_prepacks().get(torch.bfloat16, False))


def _offers_fbgemm(flat: torch.Tensor, float_copy: FloatCopy | None) -> bool:
    """Whether FBGEMM is a candidate: float32 rows (fbgemm's dynamic product takes no other) on a CPU whose
    quantized engine is fbgemm's, for any number of rows (it led at 1, 4, 16 and 128 rows of GPT-2's 768 x
    2304 product on an AVX-512 EPYC, cache-cold: 0.15, 0.13, 0.18 and 1.1 ms against the int8 kernel's
    0.29, 0.29, 0.87 and 4.4)."""
    return (float_copy is not None and flat.dtype == torch.float32 and flat.device.type == "cpu"
            and fbgemm_engine())


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
        if name == KEPT_BF16:  # reordered copies, as the kept one is
            reordered = [_reordered(m) for m in from_memory(dequantized(weight, scales, torch.bfloat16))]
            mats = itertools.cycle(reordered) if decode else itertools.repeat(reordered[0])
            return synchronized(lambda: bf16_prepacked_product(flat, next(mats)), flat.device)
        if name == FBGEMM:  # packed copies (packed here, before the clock starts, as the kept one is)
            packs = [packed_for_fbgemm(w, scales) for w in (from_memory(weight) if decode else [weight])]
            return synchronized(lambda p=itertools.cycle(packs): fbgemm_dynamic_product(flat, next(p)), flat.device)
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


def bf16_prepacked_product(x: torch.Tensor, reordered: torch.Tensor) -> torch.Tensor:
    """(R, in) float rows, rounded to bf16, times a bf16 matrix in oneDNN's layout, back in x's dtype.

    Where the CPU has bf16 instructions, oneDNN's bf16 product of a few rows reads memory about as fast as
    a float32 one (13.9 GB/s for GPT-2's head on one core of an AVX-512-bf16 EPYC, 5.6 ms) while torch's
    int8 kernel is bound by its arithmetic (4 GB/s, 9.4 ms): two bytes a weight can beat one. The rows
    are rounded as "int8 kernel, bf16 rows" rounds them, the weight to bf16's 8 significant bits.
    """
    y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), reordered, None, "none", [], "")  # (R, out)
    return y.to(x.dtype)


class Packed:
    """An fbgemm packed weight (torch's LinearPackedParams object) and the bytes it holds: the int8 matrix,
    and per output channel a float scale, an int32 zero point and an int32 column sum."""

    def __init__(self, params: object, nbytes: int) -> None:
        self.params, self.nbytes = params, nbytes


def packed_for_fbgemm(weight: torch.Tensor, scales: torch.Tensor) -> Packed:
    """`weight` (out, in) int8 with per-row `scales` as fbgemm's per-channel qint8 weight (zero points 0:
    the same symmetric int8 values), packed once for its dynamic product."""
    out_features = weight.size(0)
    with warnings.catch_warnings():  # torch marks its quantized tensor constructors deprecated (not the ops)
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch._make_per_channel_quantized_tensor(
            weight.contiguous(), scales.double(), torch.zeros(out_features, dtype=torch.long), 0)
    with torch.no_grad():
        params = torch.ops.quantized.linear_prepack(quantized, None)
    return Packed(params, weight.numel() + 12 * out_features)


def fbgemm_dynamic_product(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(R, in) float32 rows times fbgemm's packed int8 weight: the rows quantized to uint8 on the fly, one
    scale for them all (their range), an int8 x int8 product into int32, scaled back to float32.

    It reads one byte a weight and multiplies in integers, so it runs near the memory's rate where torch's
    int8 weight-only kernel (float activations) is bound by its arithmetic: GPT-2's 768 x 2304 product of one
    row, cache-cold, took 0.15 ms here against 0.29 ms (int8 kernel, bf16 rows) and 0.62 ms (float32) on an
    AVX-512 EPYC. The price is the activations' quantization: 7-bit activations (`reduce_range`, fbgemm's
    setting for dynamic quantization: AVX2 without VNNI sums pairs of u8 x s8 products in 16 bits, which
    8-bit activations can overflow) give a relative error of about 1.5% per product against the dequantized
    float product, where weight-only int8 gives 1e-6; the measured validation loss of a trained model is in
    benchmarks/results/int8_quality.md.
    """
    return torch.ops.quantized.linear_dynamic(x.contiguous(), packed.params, True)


def _reordered(matrix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(matrix, DECODE_ROWS)


INT8_PRODUCTS: dict[str, Callable[..., torch.Tensor]] = {
    "dequantized": dequantized_product, "int8 kernel": packed_int8_product,
    "int8 kernel, bf16 rows": packed_int8_product_in_bf16,
}
chooser.CANDIDATES["int8"] = (*INT8_PRODUCTS, KEPT, KEPT_BF16, FBGEMM)
