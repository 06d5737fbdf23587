"""The fast paths behind the model's plain operations: linear layers, attention, GELU, int8 weights.

model.py says what GPT-2 computes; this module decides how, on the machine at hand. Each operation has
a few candidates that compute the same function (up to float rounding, tested against the plain torch
call), and `fastest` picks one by timing them all on this machine, on the shape at hand, the first
time the shape comes up, as `torch.backends.cudnn.benchmark` does. No candidate is taken for being
fast somewhere else: a row-block product that doubles one CPU's decoding speed halved another's.

- `linear`: decoding multiplies each weight by a few rows, where CPU BLAS may run a float32
  matrix-vector product on one thread. Candidates: `F.linear`, W @ x^T (the other orientation of the
  tall, skinny product), `matvec_rows` (one block of the weight's rows per thread) and oneDNN's
  product on a weight reordered once for it (`prepacked_product`), timed on weights read from
  memory, as a decoding step reads them (`from_memory`). Training,
  prefill and compiled graphs take `F.linear`: products of many rows are what BLAS is built for.
- `attention`: torch's fused kernel, or the textbook softmax(Q K^T / sqrt(d) + M) V, whose two products
  run at the matmul rate (torch's fused CPU kernel gains little from bf16). With autograd on, forward
  and backward are timed together. The textbook formula keeps its (T, S) weights for the backward
  pass, so it is a candidate only while they are small (TEXTBOOK_SCORES).
- `gelu`: torch's tanh GELU kernel, or the same function as x * sigmoid(2u). In a compiled graph each
  becomes one fused loop, on tanh or on exp; the choice there is made by timing those two functions.
- `int8_linear` and `quantize_int8`: weight-only int8 decoding (per-output-channel scales, float
  activations) through torch's int8 weight-packed product.

Choices are kept for the process and, so that every process on the machine computes the same way (a
resumed run repeats the bits of an uninterrupted one), in a JSON file per machine under
~/.cache/gptlab (`GPTLAB_KERNEL_CACHE` names another file; "off" keeps choices in memory only).
Measuring never moves torch's random number generators. `force(attention=..., linear=..., gelu=...,
int8=...)` pins a choice, for tests and for tools (such as FLOP counters) that must see the products.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .fileio import atomic_write_json

ROUNDS = 5  # timed rounds per candidate, after one warm-up call; each candidate's fastest counts
MAX_ROUNDS = 40  # on a busy machine, rounds go on until each candidate's best is seen twice (fastest)
BUDGET_SECONDS = 0.1  # ... but past one round, a key's measurement stops once it has taken this long
DECODE_ROWS = 16  # products of at most this many rows choose among the linear candidates
FALLBACK_CACHE_BYTES = 64 * 2**20  # where the CPU's caches cannot be read, decoding candidates read this much
MAX_COPIES = 256  # ... and at most this many copies of one weight
TEXTBOOK_SCORES = 2**24  # the textbook attention is a candidate while B * nh * T * S is at most this

_chosen: dict[tuple, str] = {}  # key -> candidate, this process
_forced: dict[str, str] = {}


# --- choosing by measurement -------------------------------------------------------------------


def fastest(
    key: tuple, names: tuple[str, ...], build: Callable[[], Mapping[str, Callable[[], object]]], *,
    rounds: int = ROUNDS, clock: Callable[[], float] = time.perf_counter,
) -> str:
    """Which of `names` runs fastest for `key`, measured once per machine.

    A key met before, in this process or (through the disk cache) another, is answered at once.
    Otherwise `build()` makes the candidates, one call each; each runs once to warm up (first calls
    allocate, pack weights, fill caches), then `rounds` times or more, the order reversing every round
    so that none always runs first. Other work on the machine only adds time, so each candidate's
    fastest round is its figure, and the fastest figure wins; the rounds go on (up to MAX_ROUNDS)
    while some candidate's two fastest rounds differ by more than 10%, i.e. while the machine's other
    work may still hide a candidate's speed. A key's measurement stops after BUDGET_SECONDS (one round
    at least), so that the first request a server answers, or the first step of a run, waits at most
    a fraction of a second per shape even on a machine too busy to measure well.
    """
    chosen = _chosen.get(key)
    if chosen is not None:
        return chosen
    with _disk_cache() as on_disk:
        entry = on_disk.get(str(key))
        chosen = entry.get("choice") if isinstance(entry, dict) else None
        if chosen not in names:
            with torch.random.fork_rng(devices=_cuda_devices()):  # dropout in a candidate draws numbers
                seconds = _time_candidates(build(), rounds, clock)
            chosen = min(seconds, key=seconds.__getitem__)
            on_disk[str(key)] = {"choice": chosen, "seconds": seconds}
    _chosen[key] = chosen
    return chosen


def _time_candidates(
    candidates: Mapping[str, Callable[[], object]], rounds: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Each candidate's fastest round, in seconds."""
    names = list(candidates)
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + BUDGET_SECONDS  # wall time, whatever `clock` is
    for r in range(MAX_ROUNDS):
        for name in names if r % 2 == 0 else names[::-1]:
            start = clock()
            candidates[name]()
            times[name].append(clock() - start)
        two_best = [sorted(t)[:2] for t in times.values()]
        if (r + 1 >= rounds and all(b <= 1.1 * a for a, b in two_best)) or time.perf_counter() > deadline:
            break
    return {name: min(t) for name, t in times.items()}


@contextlib.contextmanager
def force(**choices: str) -> Iterator[None]:
    """Inside the block, take the named candidate for each operation, e.g. force(attention="textbook")."""
    for operation, name in choices.items():
        known = CANDIDATES.get(operation)
        if known is None:
            raise ValueError(f"no choice named {operation!r}; choices: {', '.join(CANDIDATES)}")
        if name not in known:
            raise ValueError(f"{operation} must be one of {known}, got {name!r}")
    previous = dict(_forced)
    _forced.update(choices)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _synchronized(run: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`run`, finished on the device before it returns, so that the clock sees its whole cost."""
    if device.type != "cuda":
        return run

    def finished() -> object:
        result = run()
        torch.cuda.synchronize(device)
        return result

    return finished


def _dtype(name: str) -> torch.dtype:
    """torch.bfloat16 for "torch.bfloat16" (keys hold dtypes as strings: constants for torch.compile)."""
    return getattr(torch, name.removeprefix("torch."))


def _bucket(n: int) -> int:
    """n rounded up to a power of two: one measurement for every size in between."""
    return 1 << max(0, n - 1).bit_length()


def cache_path() -> Path | None:
    """The file that keeps this machine's choices, or None when GPTLAB_KERNEL_CACHE is "off"."""
    configured = os.environ.get("GPTLAB_KERNEL_CACHE", "")
    if configured.lower() == "off":
        return None
    if configured:
        return Path(configured)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab"
    return root / f"kernels-{_machine_fingerprint()}.json"


def _machine_fingerprint() -> str:
    """A short hash of what a choice depends on: the CPU, the GPUs, torch's version and build."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    text = json.dumps([cpu, gpus, torch.__version__, torch.__config__.show()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _disk_cache() -> Iterator[dict[str, dict]]:
    """The choices on disk, under an exclusive lock, written back if the block added any.

    The lock makes a second process wait for the first one's measurement and then take it (DDP's
    processes choose alike, and do not time their candidates against each other). A cache that
    cannot be read or written leaves the choices to this process.
    """
    path = cache_path()
    lock = None
    choices: dict[str, dict] = {}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_name(path.name + ".lock"), "a")
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.is_file():
                loaded = json.loads(path.read_text())
                if isinstance(loaded, dict):
                    choices = {str(k): v for k, v in loaded.items()}
        except (OSError, ValueError):
            pass
    before = dict(choices)
    try:
        yield choices
        if path is not None and lock is not None and choices != before:
            try:
                atomic_write_json(path, dict(sorted(choices.items())))
            except Exception:  # an unwritable cache only costs a measurement in the next process
                pass
    finally:
        if lock is not None:
            lock.close()  # releases the lock


# --- linear layers -----------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias, through whichever product is fastest for this shape."""
    rows = x.numel() // x.size(-1)
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or rows > DECODE_ROWS:
        return F.linear(x, weight, bias)
    return LINEAR_PRODUCTS[linear_path(x, weight, bias)](x, weight, bias)


def linear_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The fastest of LINEAR_PRODUCTS for these shapes on this machine (measured once)."""
    if "linear" in _forced:
        return _forced["linear"]
    # rows rounded up to a power of two: a server's batch passes through every size, and each new key
    # costs copies of the weight (`from_memory`)
    key = ("linear", _bucket(x.numel() // x.size(-1)), *weight.shape, str(x.dtype), str(weight.dtype),
           bias is not None, str(weight.device), torch.get_num_threads(), "weights from memory", "row-major result")

    names = tuple(name for name in LINEAR_PRODUCTS if name != "prepacked" or can_prepack(weight))

    def build() -> dict[str, Callable[[], object]]:
        copies = from_memory(weight)
        if "prepacked" in names:  # reordered before the clock starts, as a decoding step finds them
            for copy in copies:
                prepacked_weight(copy)
        weights = itertools.cycle(copies)
        return {name: _synchronized(lambda p=LINEAR_PRODUCTS[name]: p(x, next(weights), bias), x.device)
                for name in names}

    return fastest(key, names, build)


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
    return [weight] + [weight.clone() for _ in range(copies - 1)]


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
    """Whether oneDNN can take `weight` prepacked: a CPU float32 or bf16 matrix, in a build with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and weight.dim() == 2
            and _onednn_prepacks())


@functools.cache
def _onednn_prepacks() -> bool:
    """Whether this torch build has oneDNN's weight reordering (asked once: decoding asks every product)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


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


_PREPACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> ((data_ptr, version), reordered weight)
LINEAR_PRODUCTS: dict[str, Callable[..., torch.Tensor]] = {
    "F.linear": F.linear, "W @ x^T": tall_product, "row blocks": matvec_rows, "prepacked": prepacked_product,
}


class Linear(nn.Linear):
    """nn.Linear (the same parameters and numbers) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# --- attention ---------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M) v for q (B, nh, T, hs) and k, v (B, nh, S, hs).

    `mask` is a bool tensor broadcastable to (B, nh, T, S), True where a query may attend; None means
    causal with the queries at the end of the keys (query t sees keys 0 .. S - T + t).
    """
    key = attention_key(q, k, mask, dropout_p)
    path = _forced.get("attention") or (
        _compiled_attention_path(key) if torch.compiler.is_compiling() else attention_path(key)
    )
    return ATTENTION_PATHS[path](q, k, v, mask, dropout_p)


def attention_key(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> tuple:
    """What the attention choice depends on: shapes (lengths rounded up to a power of two), dtype,
    device, whether autograd is on, the mask's leading shape and whether dropout runs."""
    B, nh, T, hs = q.shape
    S = k.size(-2)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    mask_shape = None if mask is None else tuple(int(d) for d in mask.shape[:-2])
    T, S = (1, _bucket(S)) if T == 1 else (_bucket(T), _bucket(T) if T == S else _bucket(S))
    return ("attention", B, nh, T, S, hs, str(q.dtype), str(q.device), grad, mask_shape, dropout_p > 0)


def attention_path(key: tuple) -> str:
    """The faster of ATTENTION_PATHS for `attention_key`'s key on this machine (measured once)."""
    _, B, nh, T, S, hs, dtype, device, grad, mask_shape, dropout = key
    paths = tuple(name for name in ATTENTION_PATHS if name != "textbook" or B * nh * T * S <= TEXTBOOK_SCORES)
    if len(paths) == 1:
        return paths[0]

    def build() -> dict[str, Callable[[], object]]:
        generator = torch.Generator().manual_seed(0)
        dt, where = _dtype(dtype), torch.device(device)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(where, dt).requires_grad_(grad)

        q, k, v = randn(B, nh, T, hs), randn(B, nh, S, hs), randn(B, nh, S, hs)
        grad_out = torch.randn(B, nh, T, hs, generator=generator).to(where, dt)
        mask = None if mask_shape is None else torch.ones(*mask_shape, T, S, dtype=torch.bool, device=where)
        p = 0.1 if dropout else 0.0

        def run(path: str) -> Callable[[], object]:
            def once() -> object:
                y = ATTENTION_PATHS[path](q, k, v, mask, p)
                return torch.autograd.grad(y, (q, k, v), grad_out) if grad else y
            return _synchronized(once, where)

        return {path: run(path) for path in paths}

    return fastest(key, paths, build)


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


ATTENTION_PATHS: dict[str, Callable[..., torch.Tensor]] = {"fused": fused_attention, "textbook": textbook_attention}


# --- GELU --------------------------------------------------------------------------------------


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, x * (1 + tanh(u)) / 2 with u = sqrt(2/pi) * (x + 0.044715 x^3), in its faster form."""
    form = _forced.get("gelu")
    if form is None and torch.compiler.is_compiling():
        form = _compiled_gelu_form(str(x.dtype), str(x.device))
    elif form is None:
        form = gelu_form(_bucket(x.numel()), str(x.dtype), str(x.device), torch.is_grad_enabled() and x.requires_grad)
    return GELU_FORMS[form](x)


def gelu_form(n: int, dtype: str, device: str, grad: bool) -> str:
    """The faster of GELU_FORMS in eager mode on n elements, measured once.

    torch's GELU is one kernel; the sigmoid form is several passes over memory, but on exp instead of
    tanh, which some CPUs evaluate several times faster.
    """
    def build() -> dict[str, Callable[[], object]]:
        where = torch.device(device)
        x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(where, _dtype(dtype))
        x.requires_grad_(grad)

        def run(form: str) -> Callable[[], object]:
            def once() -> object:
                y = GELU_FORMS[form](x)
                return torch.autograd.grad(y, x, y) if grad else y
            return _synchronized(once, where)

        return {form: run(form) for form in GELU_FORMS}

    return fastest(("gelu", n, dtype, device, grad), tuple(GELU_FORMS), build)


@torch.compiler.assume_constant_result
def _compiled_gelu_form(dtype: str, device: str) -> str:
    """The GELU form for a compiled graph, run eagerly while torch.compile traces.

    There either form becomes one fused loop whose cost is its transcendental function, tanh or exp
    (as sigmoid), so the faster of torch's tanh and sigmoid, timed on a tensor that stays in cache,
    decides.
    """
    def build() -> dict[str, Callable[[], object]]:
        where = torch.device(device)
        x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)).to(where, _dtype(dtype))
        return {"tanh": _synchronized(lambda: torch.tanh(x), where),
                "sigmoid": _synchronized(lambda: torch.sigmoid(x), where)}

    return fastest(("compiled gelu", dtype, device), tuple(GELU_FORMS), build)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def sigmoid_form_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU as x * sigmoid(2u), since (1 + tanh(u)) / 2 = sigmoid(2u); 2u = x * (a + b x^2)."""
    return x * torch.sigmoid(x * (_GELU_LINEAR + _GELU_CUBIC * x * x))


_GELU_LINEAR = 2 * math.sqrt(2 / math.pi)
_GELU_CUBIC = _GELU_LINEAR * 0.044715
GELU_FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"tanh": tanh_gelu, "sigmoid": sigmoid_form_gelu}



# --- int8 weights ------------------------------------------------------------------------------


def quantize_int8(model: nn.Module) -> nn.Module:
    """Weight-only int8, in place: every linear layer's weight becomes int8 with one float scale per
    output channel (its largest magnitude / 127), the activations stay in float. Returns `model`.

    Decoding reads every weight once per step, so a quarter of float32's bytes reads up to four times
    faster where memory is the limit. An embedding whose matrix a linear layer shares (GPT-2's tied
    token embedding and LM head) shares the int8 matrix too and looks up dequantized rows. Quantize a
    model for inference, after moving it to its device and dtype; the files it was loaded from are not
    touched, and `save_model` refuses a quantized model.
    """
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    by_weight = {}
    for name, module in linears:
        quantized = Int8Linear.from_linear(module)
        by_weight[id(module.weight)] = quantized
        _replace_module(model, name, quantized)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding) and id(module.weight) in by_weight:
            _replace_module(model, name, Int8Embedding(by_weight[id(module.weight)]))
    return model


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values and (out,) float32 scales, weight ~= values * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)  # (out,)
    values = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return values, scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 rows with float scales; it computes through
    `int8_linear`. Inference only: it holds buffers, not parameters."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,)
        self.register_buffer("bias", bias)  # (out,) or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        values, scales = quantize_rows(linear.weight)
        dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(values, scales.to(dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """The rows of an `Int8Linear`'s weight, dequantized, looked up by token id (a tied embedding)."""

    def __init__(self, shared: Int8Linear) -> None:
        super().__init__()
        self.shared = [shared]  # a plain list: the matrix belongs to the linear layer, not twice to the model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        linear = self.shared[0]
        return F.embedding(idx, linear.weight).to(linear.scales.dtype) * linear.scales[idx].unsqueeze(-1)


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (scales[:, None] * weight)^T + bias for an int8 `weight`, through the fastest available product."""
    flat = x.reshape(-1, x.size(-1))  # (R, in)
    products = int8_products(flat, weight)
    if _forced.get("int8") in products:
        path = _forced["int8"]
    elif len(products) == 1 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        path = "dequantized"
    else:
        rows = flat.size(0)
        decode = rows <= DECODE_ROWS
        key = ("int8 linear", _bucket(rows), *weight.shape, str(x.dtype), str(weight.device),
               torch.get_num_threads(), *(["weights from memory", "rows bucketed"] if decode else []))

        def build() -> dict[str, Callable[[], object]]:
            weights = itertools.cycle(from_memory(weight)) if decode else itertools.repeat(weight)
            return {name: _synchronized(lambda p=product: p(flat, next(weights), scales), x.device)
                    for name, product in products.items()}

        path = fastest(key, tuple(products), build)
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
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return products
    width_ok = x.size(-1) % 16 == 0
    if x.dtype == torch.float32 or width_ok:
        products["int8 kernel"] = packed_int8_product
    if x.dtype == torch.float32 and width_ok:
        products["int8 kernel, bf16 rows"] = packed_int8_product_in_bf16
    return products


def dequantized_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype) * scales.to(x.dtype)[:, None])


def packed_int8_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales.to(x.dtype))


def packed_int8_product_in_bf16(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return packed_int8_product(x.to(torch.bfloat16), weight, scales).to(x.dtype)


CANDIDATES = {
    "linear": tuple(LINEAR_PRODUCTS), "attention": tuple(ATTENTION_PATHS), "gelu": tuple(GELU_FORMS),
    "int8": ("dequantized", "int8 kernel", "int8 kernel, bf16 rows"),
}
