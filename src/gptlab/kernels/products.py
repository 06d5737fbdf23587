"""Linear layers: the product x @ W^T + b, through whichever candidate decodes fastest here.

Decoding multiplies each weight by a few rows, where CPU BLAS may run a float32 matrix-vector product
on one thread. Candidates: `F.linear`, W @ x^T (the other orientation of the tall, skinny product),
`matvec_rows` (one block of the weight's rows per thread) and oneDNN's product on a weight reordered
once for it (`prepacked_product`, offered only where oneDNN says it can take the weight's dtype) and,
for bf16 weights, fbgemm's product on a float16 copy (`fp16_weight_product`, where torch's quantized
engine is fbgemm's), timed on weights read from memory, as a decoding step reads them (`from_memory`). Training, prefill
and compiled graphs take `F.linear`: products of many rows are what BLAS is built for.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import chooser
from .chooser import bucket, synchronized

DECODE_ROWS = 16  # products of at most this many rows choose among the linear candidates
FBGEMM_ENGINES = ("x86", "fbgemm")  # torch's quantized engines whose dynamic linear products are fbgemm's
FALLBACK_CACHE_BYTES = 64 * 2**20  # where the CPU's caches cannot be read, decoding candidates read this much
MAX_COPIES = 256  # ... and at most this many copies of one weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias, through whichever product is fastest for this shape."""
    rows = x.numel() // x.size(-1)
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or rows > DECODE_ROWS:
        return F.linear(x, weight, bias)
    return LINEAR_PRODUCTS[linear_path(x, weight, bias)](x, weight, bias)


def linear_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The fastest of LINEAR_PRODUCTS for these shapes on this machine (measured once)."""
    pinned = chooser.forced("linear")
    if pinned is not None:  # where the pinned candidate is not offered for this weight, the plain product
        return pinned if _offered(pinned, weight) else "F.linear"
    # rows rounded up to a power of two: a server's batch passes through every size, and each new key
    # costs copies of the weight (`from_memory`)
    # (a key names the candidates a cache written without them lacks: a choice made before is measured again)
    key = ("linear", bucket(x.numel() // x.size(-1)), *weight.shape, str(x.dtype), str(weight.dtype),
           bias is not None, str(weight.device), torch.get_num_threads(), "weights from memory", "row-major result",
           *([FP16] if can_fp16(weight) else []))
    chosen = chooser.known(key)
    if chosen is not None:
        return chosen

    names = tuple(name for name in LINEAR_PRODUCTS if _offered(name, weight))

    copies = functools.cache(lambda: from_memory(weight))
    weights = functools.cache(lambda: itertools.cycle(copies()))

    def build(name: str) -> Callable[[], object]:
        if name == "prepacked":  # reordered before the clock starts, as a decoding step finds them
            for copy in copies():
                prepacked_weight(copy)
        if name == FP16:  # packed before the clock starts, likewise
            for copy in copies():
                fp16_weight(copy)
        product = LINEAR_PRODUCTS[name]
        return synchronized(lambda: product(x, next(weights()), bias), x.device)

    return chooser.fastest(key, names, build, plain="F.linear")


def _offered(name: str, weight: torch.Tensor) -> bool:
    """Whether candidate `name` is offered for `weight`: every one but those that need what this CPU or
    weight may lack (oneDNN's reorder for its dtype; fbgemm, for a bf16 weight)."""
    if name == "prepacked":
        return can_prepack(weight)
    if name == FP16:
        return can_fp16(weight)
    return True


def from_memory(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` and copies of it, together twice the largest CPU cache, to be taken in turn.

    A decoding step reads every weight once, so by the time it comes back to one weight it has read
    all the others: the weight comes from memory, not from cache. A product timed again and again on
    one cache-resident matrix measures something else (here a 768 x 768 float32 product took 0.07 ms
    from cache and 0.22 ms from memory through F.linear, against 0.11 ms as row blocks), so decoding
    candidates are timed on the copies in turn. GPUs keep the one matrix: their caches are small
    beside a model's weights, and the copies would cost GPU memory.
    """
    copies = 1
    if weight.device.type == "cpu":
        copies = min(MAX_COPIES, math.ceil(2 * (largest_cache_bytes() or FALLBACK_CACHE_BYTES) / max(weight.nbytes, 1)))
    if copies == 1:
        return [weight]
    if not weight.is_contiguous():
        return [weight] + [weight.clone() for _ in range(copies - 1)]
    stride = -(-weight.nbytes // 64) * 64  # each copy starts 64-byte aligned
    buffer = _borrow(stride * (copies - 1), weight.device)
    views = [buffer[i * stride:i * stride + weight.nbytes].view(weight.dtype).view(weight.shape)
             for i in range(copies - 1)]
    for view in views:
        view.copy_(weight)
    _lent.append((buffer, [weakref.ref(view) for view in views]))
    return [weight] + views


def _borrow(nbytes: int, device: torch.device) -> torch.Tensor:
    """Bytes for `from_memory`'s copies: a scratch buffer no live copy uses, else a new one.

    Fresh memory costs a page fault per 4 KiB: cloning 28 copies of a 7-MB weight took 460 ms on a
    busy 2-core EPYC, copying them into memory already touched 34 ms, and GPT-2's measurement makes
    about 20 such sets. The buffers are kept until `release_scratch` (the engine calls it when idle).
    """
    global _lent
    _lent = [(b, refs) for b, refs in _lent if any(r() is not None for r in refs)]
    busy = {b.data_ptr() for b, _ in _lent}
    for buffer in _scratch:
        if buffer.device == device and buffer.numel() >= nbytes and buffer.data_ptr() not in busy:
            return buffer[:nbytes]
    _scratch[:] = [b for b in _scratch if b.data_ptr() in busy]  # too small: replaced, not kept beside
    _scratch.append(torch.empty(nbytes, dtype=torch.uint8, device=device))
    return _scratch[-1]


def release_scratch() -> None:
    """Give back the memory `from_memory`'s copies used (the measurements that needed it are over)."""
    _scratch.clear()
    _lent.clear()


_scratch: list[torch.Tensor] = []  # byte buffers for from_memory's copies, reused across measurements
_lent: list[tuple[torch.Tensor, list[weakref.ref]]] = []  # (buffer, its copies) while a copy lives


def largest_cache_bytes() -> int:
    """The size of the largest CPU cache that Linux reports for cpu0 (e.g. 32768K), 0 where it cannot be read."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            pass
    return max(sizes)


def tall_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T computed as (weight @ x^T)^T: the same product in the other orientation.

    The result is copied back to row-major order (R x out elements, small beside the weight): a
    transposed result would send what follows down slower paths (scaled_dot_product_attention falls
    back to its math kernel when a query's last stride is not 1), and the copy is part of the timing.
    """
    flat = x.reshape(-1, x.size(-1))  # (R, in)
    if bias is None:
        y = torch.mm(weight, flat.t())  # (out, R)
    else:
        y = torch.addmm(bias[:, None], weight, flat.t())  # (out, R), the bias added in the product
    return y.t().contiguous().reshape(*x.shape[:-1], weight.size(0))


def matvec_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) with the weight's rows cut into one block per thread, multiplied as a batch.

    A step of decoding is one read of every weight. Where BLAS runs a product of a few rows on one
    thread, the batched product gives each thread a block, so every core reads. Rows go through in
    groups of 4, each group reading the weights once.
    """
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)  # (R, in)
    groups = [_row_block_product(rows, weight) for rows in flat.split(4)]
    y = groups[0].contiguous() if len(groups) == 1 else torch.cat(groups)  # (R, out), row-major as tall_product's
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


def prepacked_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias through oneDNN, with the weight reordered once into oneDNN's blocked layout.

    F.linear on a CPU reorders the weight for its kernel on every call; with the few rows of a
    decoding step that reordering is a second pass over the weight (measured on an AMX Xeon: a bf16
    2304 x 768 product 0.28 ms through F.linear, 0.18 ms prepacked, the same bits). The reordered copy
    is kept beside the weight (`prepacked_weight`), so decoding through this candidate holds each
    weight it multiplies twice.
    """
    flat = x.reshape(-1, x.size(-1))  # (R, in)
    y = torch.ops.mkldnn._linear_pointwise(flat, prepacked_weight(weight), bias, "none", [], "")  # (R, out)
    return y.reshape(*x.shape[:-1], weight.size(0))


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can take `weight` prepacked: a CPU float32 matrix, or a bf16 one where oneDNN says
    this CPU runs bf16 (without AVX-512 or avx_ne_convert its reorder raises), in a build with oneDNN."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return False
    return _onednn_prepacks().get(weight.dtype, False)


@functools.cache
def _onednn_prepacks() -> dict[torch.dtype, bool]:
    """The dtypes this torch build's oneDNN can reorder weights for on this CPU, as far as torch can say
    (asked once: decoding asks every product; ONEDNN_MAX_CPU_ISA is read when the process starts)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return {}
    return {torch.float32: True, torch.bfloat16: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def prepacked_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in oneDNN's layout, reordered on first use and again whenever the weight changes."""
    stamp = (weight.data_ptr(), _version(weight))
    entry = _PREPACKED.get(weight)
    if entry is None or entry[0] != stamp:
        with torch.no_grad():
            entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), DECODE_ROWS))
        _PREPACKED[weight] = entry
    return entry[1]


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter (tensors made under inference mode have none: 0)."""
    try:
        return t._version
    except RuntimeError:
        return 0


def fp16_weight_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias for a bf16 weight, through fbgemm's product on a float16 copy of it.

    Offered for bf16 weights only, where it costs no precision: float16 has 11 significant bits to bf16's
    8, so every bf16 weight within float16's normal range (6.1e-5 to 65504 in magnitude) is the same number
    in float16 (smaller ones lose bits below 6e-8, a fraction of their own rounding); the rows go in as
    float32 (bf16 converts exactly), fbgemm sums in float32, and the result is rounded to bf16 once, as the
    bf16 product rounds it. A float32 model is not offered it: float16 weights would change its numbers by
    about 2e-4, which `--dtype float32` does not ask for (`--dtype bfloat16` accepts bf16's 4e-3). It reads
    2 bytes a weight, as bf16 does, but fbgemm's half-precision product of a few rows ran nearer the memory's
    rate on an AVX-512 EPYC (GPT-2's 768 x 2304 product of one row, cache-cold: 0.18 ms against 0.21 ms for
    oneDNN's prepacked bf16 and 0.94 ms for F.linear). The copy is kept beside the weight
    (`fp16_weight`), as `prepacked_product` keeps its reordered one.
    """
    flat = x.reshape(-1, x.size(-1)).float()  # (R, in)
    y = torch.ops.quantized.linear_dynamic_fp16(flat.contiguous(), fp16_weight(weight))  # (R, out) float32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.size(0))


def can_fp16(weight: torch.Tensor) -> bool:
    """Whether `fp16_weight_product` is offered for `weight`: a bf16 CPU matrix, where torch's quantized
    engine is fbgemm's (its packed float16 product)."""
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype == torch.bfloat16
            and fbgemm_engine() and hasattr(torch.ops.quantized, "linear_prepack_fp16"))


@functools.cache
def fbgemm_engine() -> bool:
    """Whether torch's quantized engine here is fbgemm's (torch.backends.quantized.engine "x86" or
    "fbgemm", among the engines this build supports) and has the dynamic linear products; asked once.
    fbgemm picks its own kernels by the CPU (AVX2, AVX-512, VNNI); the chooser's guard covers a CPU where
    it still raises."""
    quantized = torch.backends.quantized
    return (quantized.engine in FBGEMM_ENGINES and quantized.engine in quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack"))


def fp16_weight(weight: torch.Tensor) -> object:
    """`weight` as fbgemm's packed float16 matrix, packed on first use and again whenever the weight
    changes. A weight beyond float16's range (65504) raises: the candidate is then unavailable."""
    stamp = (weight.data_ptr(), _version(weight))
    entry = _FP16.get(weight)
    if entry is None or entry[0] != stamp:
        with torch.no_grad():
            if weight.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError("a weight beyond float16's range (65504) has no float16 copy")
            entry = (stamp, torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), None))
        _FP16[weight] = entry
    return entry[1]


_PREPACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> ((data_ptr, version), reordered weight)
_FP16: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> ((data_ptr, version), packed float16 weight)
FP16 = "fbgemm fp16 weights"
LINEAR_PRODUCTS: dict[str, Callable[..., torch.Tensor]] = {
    "F.linear": F.linear, "W @ x^T": tall_product, "row blocks": matvec_rows, "prepacked": prepacked_product,
    FP16: fp16_weight_product,
}


class Linear(nn.Linear):
    """nn.Linear (the same parameters and numbers) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


chooser.CANDIDATES["linear"] = tuple(LINEAR_PRODUCTS)
