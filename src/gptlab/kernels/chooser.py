"""The one place that decides which candidate computes an operation: by measuring, behind a guard.

`fastest` times an operation's candidates on this machine, on the shape at hand, the first time the
shape comes up, and keeps the answer for the process and in a per-machine file on disk. A candidate
that raises while it is built, warmed up or timed is unavailable here: it is left out, recorded in the
file with its reason, logged once, and the next candidate wins; where every candidate fails, the
operation's plain torch call is taken. `GPTLAB_KERNELS=plain` skips all of it (see `mode`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import GptlabError, failure_cause
from ..fileio import atomic_write_json

ROUNDS = 5  # timed rounds per candidate, after one warm-up call; each candidate's fastest counts
MAX_ROUNDS = 40  # on a busy machine, rounds go on until each candidate's best is seen twice (fastest)
BUDGET_SECONDS = 0.1  # ... but past one round, a key's measurement stops once it has taken this long
MODES = ("auto", "plain")  # GPTLAB_KERNELS; unset is "auto"

# operation -> its candidates' names, filled in by each operation's module (for `force`)
CANDIDATES: dict[str, tuple[str, ...]] = {}
_chosen: dict[tuple, str] = {}  # key -> candidate, this process
_forced: dict[str, str] = {}
_logged: set[tuple[str, str]] = set()  # (candidate, reason) already logged by this process
log = logging.getLogger("gptlab.kernels")


def mode() -> str:
    """GPTLAB_KERNELS: "auto" (unset) measures; "plain" runs every operation as plain torch computes it.

    Read on every choice rather than once, so that a test or a tool can switch it in one process.
    """
    value = os.environ.get("GPTLAB_KERNELS", "").strip().lower() or "auto"
    if value not in MODES:
        raise GptlabError(f"GPTLAB_KERNELS must be 'auto' or 'plain' (or unset), got {os.environ['GPTLAB_KERNELS']!r}")
    return value


def forced(operation: str) -> str | None:
    """The candidate `force` pins for `operation`, or None."""
    return _forced.get(operation)


def fastest(
    key: tuple, names: tuple[str, ...], build: Callable[[str], Callable[[], object]], *, plain: str,
    rounds: int = ROUNDS, clock: Callable[[], float] = time.perf_counter,
) -> str:
    """Which of `names` runs fastest for `key` here, measured once per machine; `plain` in plain mode.

    A key met before, in this process or (through the disk cache) another, is answered at once.
    Otherwise `build(name)` makes each candidate, separately, so that one that cannot be built costs
    only itself; each runs once to warm up (first calls allocate, pack weights, fill caches), then
    `rounds` times or more, the order reversing every round so that none always runs first. Other
    work on the machine only adds time, so each candidate's fastest round is its figure, and the
    fastest figure wins; the rounds go on (up to MAX_ROUNDS) while some candidate's two fastest rounds
    differ by more than 10%, i.e. while the machine's other work may still hide a candidate's speed.
    A key's measurement stops after BUDGET_SECONDS (one round at least), so that the first request a
    server answers, or the first step of a run, waits at most a fraction of a second per shape even on
    a machine too busy to measure well. `plain` (the operation's plain torch call) is taken where
    every candidate raised.
    """
    if mode() == "plain":
        return plain
    chosen = _chosen.get(key)
    if chosen is not None:
        return chosen
    with _disk_cache() as on_disk:
        entry = on_disk.get(str(key))
        chosen = entry.get("choice") if isinstance(entry, dict) else None
        if chosen not in names:
            unavailable: dict[str, str] = {}
            with torch.random.fork_rng(devices=_cuda_devices()):  # dropout in a candidate draws numbers
                candidates = {}
                for name in names:
                    run = _guarded(name, lambda n=name: build(n), unavailable)
                    if name not in unavailable:
                        candidates[name] = run
                seconds = _time_candidates(candidates, rounds, clock, unavailable)
            chosen = min(seconds, key=seconds.__getitem__) if seconds else plain
            on_disk[str(key)] = {"choice": chosen, "seconds": seconds}
            if unavailable:
                on_disk[str(key)]["unavailable"] = unavailable
    _chosen[key] = chosen
    return chosen


def _guarded(name: str, step: Callable[[], object], unavailable: dict[str, str]) -> object:
    """step(), or None with `name` recorded in `unavailable` (and logged once) if it raised."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - whatever a candidate raises makes it unavailable here
        reason = failure_cause(exc)
        unavailable[name] = reason
        if (name, reason) not in _logged:
            _logged.add((name, reason))
            log.warning("gptlab.kernels: %r is unavailable on this machine, using another: %s", name, reason)
        return None


def _time_candidates(
    candidates: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float],
    unavailable: dict[str, str],
) -> dict[str, float]:
    """Each candidate's fastest round, in seconds; one that raises (at warm-up or timed) goes to `unavailable`."""
    names = list(candidates)
    for name in list(names):
        _guarded(name, candidates[name], unavailable)
    times: dict[str, list[float]] = {name: [] for name in names if name not in unavailable}
    deadline = time.perf_counter() + BUDGET_SECONDS  # wall time, whatever `clock` is
    for r in range(MAX_ROUNDS):
        for name in names if r % 2 == 0 else names[::-1]:
            if name not in times:
                continue
            start = clock()
            _guarded(name, candidates[name], unavailable)
            if name in unavailable:
                del times[name]
            else:
                times[name].append(clock() - start)
        if not times:
            break
        two_best = [sorted(t)[:2] for t in times.values()]
        if (r + 1 >= rounds and all(b <= 1.1 * a for a, b in two_best)) or time.perf_counter() > deadline:
            break
    return {name: min(t) for name, t in times.items()}


@contextlib.contextmanager
def force(**choices: str) -> Iterator[None]:
    """Inside the block, take the named candidate for each operation, e.g. force(attention="textbook").

    A pin wins over GPTLAB_KERNELS: it is for tests and for tools (FLOP counters) that must see one product.
    """
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


def synchronized(run: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`run`, finished on the device before it returns, so that the clock sees its whole cost."""
    if device.type != "cuda":
        return run

    def finished() -> object:
        result = run()
        torch.cuda.synchronize(device)
        return result

    return finished


def dtype_named(name: str) -> torch.dtype:
    """torch.bfloat16 for "torch.bfloat16" (keys hold dtypes as strings: constants for torch.compile)."""
    return getattr(torch, name.removeprefix("torch."))


def bucket(n: int) -> int:
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
    """A short hash of what a choice depends on: the CPU, the GPUs, torch's version and build, and what
    limits the instruction sets torch and oneDNN use (a process held to AVX2 never takes a choice made
    with AVX-512, and the candidates it found unavailable are not another process's)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    limits = {name: os.environ.get(name) for name in
              ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "GPTLAB_KERNELS")}
    isa = [torch.backends.cpu.get_cpu_capability(), torch.backends.mkldnn.is_available() and
           torch.ops.mkldnn._is_mkldnn_bf16_supported()]
    text = json.dumps([cpu, gpus, torch.__version__, torch.__config__.show(), limits, isa])
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
