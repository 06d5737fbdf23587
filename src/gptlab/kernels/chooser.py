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
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import GptlabError, failure_cause
from ..fileio import atomic_write_json

ROUNDS = 5  # timed rounds per candidate at least, after one warm-up call; each candidate's median counts
MAX_ROUNDS = 41  # on a busy machine, rounds go on while some candidate's rounds spread (median > 1.1 x fastest)
BUDGET_SECONDS = 0.1  # ... but past ROUNDS rounds, a key's measurement stops once it has taken this long
DROP_AFTER, DROP_FACTOR = 3, 2.0  # after 3 rounds, a candidate whose fastest round is over 2x the leader's
# slowest is clearly slower: it is timed no more (a 150-ms head need not run ROUNDS times); a bound on the
# leader's median instead dropped F.linear on a busy machine after three rounds where its rival had been lucky
MODES = ("auto", "plain")  # GPTLAB_KERNELS; unset is "auto"

# operation -> its candidates' names, filled in by each operation's module (for `force`)
CANDIDATES: dict[str, tuple[str, ...]] = {}
_chosen: dict[tuple, str] = {}  # key -> candidate, this process
_entries: dict[tuple, dict] = {}  # key -> what the disk cache holds for it (seconds, reason), this process
_forced: dict[str, str] = {}
_logged: set[str] = set()  # warnings already logged by this process (warn_once)
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
    rounds: int = ROUNDS, budget: float = BUDGET_SECONDS, clock: Callable[[], float] = time.perf_counter,
    reason: Callable[[dict], str] | None = None,
) -> str:
    """Which of `names` runs fastest for `key` here, measured once per machine; `plain` in plain mode.

    A key met before, in this process or (through the disk cache) another, is answered at once.
    Otherwise `build(name)` makes each candidate, separately, so that one that cannot be built costs
    only itself; each runs once to warm up (first calls allocate, pack weights, fill caches), then
    `rounds` times or more, interleaved (the order reversing every round, so that none always runs
    first and a change of load touches all alike), and each candidate's median round is its figure:
    on a busy machine a candidate's single luckiest round says little about the next thousand calls
    (a row-block product with a lucky 0.4-ms round, then 10 ms a call, was chosen by its fastest
    round). The rounds go on (up to MAX_ROUNDS) while some candidate's median is over 10% above its
    fastest round, i.e. while the machine's other work disturbs the figures, until the key's
    measurement has taken `budget` seconds; a candidate clearly slower than the leader (its fastest
    round over DROP_FACTOR x the leader's slowest) after DROP_AFTER rounds stops being timed, so that a slow one costs startup little. `plain` (the
    operation's plain torch call) is taken where every candidate raised.

    The choice goes to the disk cache with each candidate's median, the rounds run, the medians of
    those dropped, what was unavailable and why, and `reason(record)` (the caller's account of all that,
    where it gives one): `entry` returns the record.
    """
    if mode() == "plain":
        return plain
    chosen = _chosen.get(key)
    if chosen is not None:
        return chosen
    with _disk_cache() as on_disk:
        record = on_disk.get(str(key))
        chosen = record.get("choice") if isinstance(record, dict) else None
        if chosen not in names:
            unavailable: dict[str, str] = {}
            with torch.random.fork_rng(devices=_cuda_devices()):  # dropout in a candidate draws numbers
                candidates = {}
                for name in names:
                    run = _guarded(name, lambda n=name: build(n), unavailable)
                    if name not in unavailable:
                        candidates[name] = run
                timed: dict[str, list[float]] = {}
                seconds = _time_candidates(candidates, rounds, clock, unavailable, budget, timed)
            chosen = min(seconds, key=seconds.__getitem__) if seconds else plain
            record = {"choice": chosen, "seconds": seconds, "rounds": max(map(len, timed.values()), default=0)}
            dropped = {name: statistics.median(t) for name, t in timed.items() if name not in seconds and t}
            if dropped:
                record["dropped"] = dropped
            if unavailable:
                record["unavailable"] = unavailable
            if reason is not None:
                record["reason"] = reason(record)
            on_disk[str(key)] = record
    _chosen[key] = chosen
    _entries[key] = record
    return chosen


def known(key: tuple) -> str | None:
    """The choice this process already made for `key`, or None: a decoding step asks every operation's
    choice, and this answers before the caller builds its candidates (about 10 microseconds each)."""
    return _chosen.get(key) if mode() == "auto" else None


def entry(key: tuple) -> dict | None:
    """What `fastest` recorded for `key` (choice, seconds, rounds, reason), if this process chose it."""
    return _entries.get(key)


def _guarded(name: str, step: Callable[[], object], unavailable: dict[str, str]) -> object:
    """step(), or None with `name` recorded in `unavailable` (and logged once) if it raised."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - whatever a candidate raises makes it unavailable here
        reason = failure_cause(exc)
        unavailable[name] = reason
        warn_once(log, f"gptlab.kernels: {name!r} is unavailable on this machine, using another: {reason}")
        return None


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log `message` as a warning the first time this process says it: a fallback is news at the first
    model that takes it, not at every one after."""
    if message not in _logged:
        _logged.add(message)
        logger.warning("%s", message)


def _time_candidates(
    candidates: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float],
    unavailable: dict[str, str], budget: float = BUDGET_SECONDS, timed: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """The median round, in seconds, of each candidate still in the race at the end (one that raises, at
    warm-up or timed, goes to `unavailable`; one clearly slower is dropped); every round's times go to `timed`."""
    names = list(candidates)
    for name in list(names):
        _guarded(name, candidates[name], unavailable)
    timed = {} if timed is None else timed
    racing = [name for name in names if name not in unavailable]
    timed.update({name: [] for name in racing})
    deadline = time.perf_counter() + budget  # wall time, whatever `clock` is
    for r in range(MAX_ROUNDS):
        for name in racing if r % 2 == 0 else racing[::-1]:
            start = clock()
            _guarded(name, candidates[name], unavailable)
            timed[name].append(clock() - start)
        racing = [name for name in racing if name not in unavailable]
        if not racing:
            break
        medians = {name: statistics.median(timed[name]) for name in racing}
        if r + 1 >= DROP_AFTER:  # dropped for good only when its best round loses to the leader's worst
            worst = max(timed[min(medians, key=medians.__getitem__)])
            racing = [name for name in racing if min(timed[name]) <= DROP_FACTOR * worst]
        settled = all(medians[name] <= 1.1 * min(timed[name]) for name in racing)
        if r + 1 >= rounds and (settled or time.perf_counter() > deadline):
            break
    for name in unavailable:
        timed.pop(name, None)
    return {name: statistics.median(timed[name]) for name in racing}


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
              ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS",
               "GPTLAB_KERNELS")}
    isa = [torch.backends.cpu.get_cpu_capability(), torch.backends.mkldnn.is_available() and
           torch.ops.mkldnn._is_mkldnn_bf16_supported()]
    text = json.dumps([cpu, gpus, torch.__version__, torch.__config__.show(), limits, isa])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _disk_cache() -> Iterator[dict[str, dict]]:
    """The choices on disk, under an exclusive lock, written back if the block added any.

    The lock makes a second process wait for the first one's measurement and then take it (DDP's
    processes choose alike, and do not time their candidates against each other). Inside a block,
    another block of this process gets the same choices (flock would wait on itself). A cache that
    cannot be read or written leaves the choices to this process.
    """
    if _open_caches:  # a measurement inside a measurement (a whole decoding step's warm-up makes its
        yield _open_caches[-1]  # layers' choices): the outer block holds the lock and writes them all
        return
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
    _open_caches.append(choices)
    try:
        yield choices
        if path is not None and lock is not None and choices != before:
            try:
                atomic_write_json(path, dict(sorted(choices.items())))
            except Exception:  # an unwritable cache only costs a measurement in the next process
                pass
    finally:
        _open_caches.pop()
        if lock is not None:
            lock.close()  # releases the lock


_open_caches: list[dict[str, dict]] = []  # the disk cache a measurement in progress holds open
