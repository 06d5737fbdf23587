"""The training loop: fast on one CPU, data-parallel under torchrun, resumable exactly.

A run directory holds the model as a Hugging Face checkpoint (`config.json`, `model.safetensors`),
the tokenizer, `train_config.json`, `training_state.pt` (everything `--resume` needs, model included;
see training_state.py), `metrics.jsonl`, `loss.png`, and `best/` (the model with the lowest
validation loss so far).

One loop serves one process and many. Each step draws one global batch of `batch_size * grad_accum`
windows from the run's seeded generator; under torchrun every process draws the same global batch
and trains on its own share of its micro-batches, and DDP averages the gradients. `grad_accum` counts
the micro-batches of the whole step, so the number of processes changes the speed, not the
arithmetic: 2 processes compute what 1 process with the same `--grad-accum` computes.

SIGINT and SIGTERM end the run after the step in progress, with a checkpoint, and `--resume`
continues it with the same losses, bit for bit on a CPU, as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .adder import AdderDataset
from .checkpoint import load_model, save_model
from .config import GPTConfig, TrainConfig
from .data import TokenDataset, default_corpus_files, prepare
from .distributed import Group
from .errors import GptlabError
from .evaluate.scorer import token_nll
from .fileio import atomic_write_bytes, atomic_write_json, remove_temporaries
from .model import GPT
from .optim import configure_optimizer, learning_rate
from .report import write_report
from .run_dir import METRICS_FILE, TRAIN_CONFIG_FILE, RunDirectory, check_run_dir, claim_run_dir
from .throughput import ThroughputMeter, flops_per_token, matmul_peak
from .training_state import (
    STATE_FILE, load_training_state, process_rng_state, restore_process_rng_state, save_training_state,
)

DEFAULT_DATA_DIR = Path("data/shakespeare-char")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a resumed run may change from its saved options: how long, where and how fast it runs.
# (A new max_iters also moves the end of the learning-rate decay unless --lr-decay-iters was set.)
RESUME_OPTIONS = ("max_iters", "max_time", "device", "compile", "on_nonfinite", "log_interval", "sample_tokens")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    seconds: float
    tokens_seen: int
    stopped_by: str = ""  # "SIGINT" or "SIGTERM" when a signal ended the run early, after a checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptlabError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for the forward pass; float32 runs without it.

    The weights, the gradients and the optimizer stay in float32 whatever the dtype (mixed precision).
    float16 also needs a gradient scaler against underflow, which gptlab runs on CUDA only.
    """
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise GptlabError(
            "--dtype float16 needs a CUDA device (its gradient scaler is CUDA-only); on a CPU use bfloat16"
        )
    if device.type not in ("cpu", "cuda"):
        raise GptlabError(f"--dtype {dtype} runs on cpu and cuda devices, not {device.type}; use --dtype float32")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GptlabError("--dtype bfloat16: this GPU does not support bfloat16; use --dtype float16")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def resolve_dtype(
    name: str, device: torch.device, group: Group = Group(), model: GPTConfig | None = None, rows: int | None = None
) -> str:
    """`auto` -> bfloat16 where this device multiplies bf16 matrices at least 1.5x as fast as float32.

    That is a GPU with bf16 support, or a CPU with bf16 instructions (AVX-512-bf16, AMX), told apart by
    the same probe of the model's products (`model` at `rows` tokens a micro-batch) that MFU uses.
    Elsewhere bf16 is emulated and many times slower than float32, so `auto` keeps float32. Rank 0
    decides for every process.
    """
    if name != "auto":
        return name
    chosen = None
    if group.is_main:  # the other processes wait rather than probe alongside and slow the probe down
        if device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        else:
            bf16, fp32 = (matmul_peak(device, dtype, seconds=0.1, config=model, rows=rows)
                          for dtype in (torch.bfloat16, torch.float32))
            fast = bf16 >= 1.5 * fp32
        chosen = "bfloat16" if fast else "float32"
    return distributed.broadcast_from_main(chosen, group)


def resolve_data(config: TrainConfig) -> Path:
    """The prepared data directory; with none given, the built-in Shakespeare corpus, prepared once."""
    if config.data:
        return Path(config.data)
    if not (DEFAULT_DATA_DIR / "meta.json").is_file():
        print(f"preparing the built-in corpus (complete works of Shakespeare) in {DEFAULT_DATA_DIR}")
        prepare([str(p) for p in default_corpus_files()], "char", DEFAULT_DATA_DIR)
    return DEFAULT_DATA_DIR


def open_dataset(config: TrainConfig) -> TokenDataset | AdderDataset:
    """The data of `config.task`, with every split long enough for one window."""
    if config.task == "adder":
        dataset: TokenDataset | AdderDataset = AdderDataset()
    else:
        data_dir = resolve_data(config)
        config.data = str(data_dir)
        dataset = TokenDataset(data_dir)
    for split in ("train", "val"):
        dataset.check_length(split, config.block_size)
    return dataset


def resumed_config(run_dir: Path, given: TrainConfig) -> TrainConfig:
    """The saved options of the run in `run_dir`, with the RESUME_OPTIONS `given` sets explicitly.

    An option counts as set when it differs from TrainConfig's default; any other difference is
    reported and ignored, because it would change what the resumed run computes.
    """
    path = run_dir / TRAIN_CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GptlabError(f"{path}: cannot read the run's options ({exc})") from None
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    defaults = TrainConfig()
    ignored = []
    for name in known - {"out", "nproc"}:
        value = getattr(given, name)
        if value == getattr(defaults, name) or value == values.get(name):
            continue
        if name in RESUME_OPTIONS:
            values[name] = value
        else:
            ignored.append(f"--{name.replace('_', '-')}")
    if ignored and distributed.is_main_process():
        print(f"--resume keeps the run's saved options; ignoring {', '.join(sorted(ignored))}", file=sys.stderr)
    values.update(out=str(run_dir), nproc=given.nproc)  # nproc says how this invocation was launched
    return TrainConfig(**values)


@torch.no_grad()
def estimate_loss(
    model: GPT, dataset: TokenDataset, config: TrainConfig, device: torch.device, step: int,
    group: Group = Group(),
) -> dict[str, float]:
    """Mean loss over `eval_iters` random batches per split, drawn from an RNG of their own.

    The batches depend on the seed and the step only, so evaluating never moves the training
    generator and gives the same figures however many processes share the work.
    """
    was_training = model.training
    model.eval()
    losses = {}
    for split in ("train", "val"):
        rng = np.random.default_rng([config.seed, step, split == "val"])
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(config.eval_iters):
            x, y = dataset.get_batch(split, config.batch_size, config.block_size, rng)
            if i % group.world_size == group.rank:
                with autocast_context(device, config.dtype):
                    total += token_nll(model, x.to(device), y.to(device)).double().mean()
        losses[split] = distributed.all_reduce_sum(total, group).item() / config.eval_iters
    model.train(was_training)
    return losses


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (batch)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows a killed run logged after its last checkpoint: the resumed run logs them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _logged_step(line: str) -> float:
    """The step of one metrics line; a line cut short by a killed process counts as the future."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> GPT:
    """A fresh GPT, or with --init-from a run, a Hugging Face GPT-2 directory or a GPT-2 size to fine-tune.

    A pretrained model keeps its own architecture: `config`'s n_layer, n_head, n_embd and bias are
    overwritten with the checkpoint's, so train_config.json records the network actually trained.
    """
    if not config.init_from:
        return GPT(config.model_config(vocab_size)).to(device)
    model = load_model(config.init_from, dropout=config.dropout)
    source = model.config
    if source.vocab_size != vocab_size:
        hint = "; prepare the data with --tokenizer gpt2" if source.vocab_size == 50257 else ""
        raise GptlabError(
            f"--init-from {config.init_from}: its vocabulary has {source.vocab_size} tokens, "
            f"the data's tokenizer {vocab_size}{hint}"
        )
    if config.block_size > source.block_size:
        raise GptlabError(
            f"--block-size {config.block_size} exceeds the context of {config.init_from} ({source.block_size})"
        )
    if config.block_size < source.block_size:
        model.crop_block_size(config.block_size)  # keeps the first block_size pretrained positions
    config.n_layer, config.n_head, config.n_embd, config.bias = (
        source.n_layer, source.n_head, source.n_embd, source.bias
    )
    return model.to(device)


def compile_unavailable(device: torch.device) -> str:
    """Why torch.compile cannot work here, or "" when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({sys.version.split()[0]}) with torch {torch.__version__}"
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "torch.compile needs a C++ compiler on a CPU and none (g++, c++, clang++ or $CXX) is on PATH"
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile needs Triton on CUDA and it is not installed"
    else:
        return f"gptlab compiles on cpu and cuda devices, not {device.type}"
    return ""


class StopSignals:
    """SIGINT and SIGTERM set a flag the loop reads between steps, instead of raising mid-step.

    The step in progress finishes, a checkpoint is written and `train` returns. Further signals are
    ignored meanwhile (torchrun passes a terminal's Ctrl-C on, so a worker sees it twice); SIGKILL
    still ends the process at once, and the atomic checkpoint writes survive that.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received = self.received or signal.Signals(signum).name


class Trainer:
    """One training run in this process: set up by the constructor, carried out by `run`."""

    def __init__(
        self, config: TrainConfig, group: Group, device: torch.device, *, overwrite: bool, resume: bool,
        show_progress: bool,
    ) -> None:
        self.group, self.device = group, device
        self.show = show_progress and group.is_main
        if group.is_main:  # the run directory is claimed (and an old run replaced) after every other check
            check_run_dir(config.out, overwrite=overwrite, resume=resume)
        if resume:
            config = resumed_config(Path(config.out), config)  # its dtype was resolved when the run began
        self.config = config
        self._check_processes()
        self.accum = config.grad_accum // group.world_size  # micro-batches per process and step
        # rank 0 may prepare the built-in corpus; the others open it once it is there
        if group.is_main:
            self.dataset = open_dataset(config)
        distributed.barrier(group)
        if not group.is_main:
            self.dataset = open_dataset(config)
        self.tokenizer = self.dataset.tokenizer

        torch.manual_seed(config.seed)
        self.data_rng = np.random.default_rng(config.seed)
        state = load_training_state(Path(config.out)) if resume and group.is_main else None
        state = distributed.broadcast_from_main(state, group)
        if state is not None:
            self.model = GPT(GPTConfig(**state["model_config"]))
            self.model.load_state_dict(state["model"])
            self.model.to(device)
        else:
            self.model = build_model(config, self.tokenizer.vocab_size, device)
        # train_config.json records the choice; the probe runs the model's products at one micro-batch
        rows = config.batch_size * config.block_size
        config.dtype = resolve_dtype(config.dtype, device, group, self.model.config, rows)
        self.optimizer = configure_optimizer(self.model, config, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.best_val, self.last_eval_step, self.saved_step = math.inf, 0, -1
        self.losses = {"train": math.nan, "val": math.nan}
        self.metrics = None
        self.run_directory: RunDirectory | None = None
        if group.is_main:
            self.run_directory = claim_run_dir(config.out, config.preset or "run", overwrite=overwrite, resume=resume)
        self.run_dir: Path = distributed.broadcast_from_main(self.run_directory and self.run_directory.path, group)
        try:
            if state is not None:
                self._restore(state)
            else:
                if group.rank > 0:
                    torch.manual_seed(config.seed + group.rank)  # each process its own dropout draws
                if group.is_main:
                    atomic_write_json(self.run_dir / TRAIN_CONFIG_FILE, config.to_dict())
                    self.tokenizer.save(self.run_dir)
            self.model.train()
            self.step_model = self._prepare_for_training(self.model)
            self.metrics = open(self.run_dir / METRICS_FILE, "a") if group.is_main else None
            self.meter = ThroughputMeter(self._peak_flops(), warn=self._warn_once_on_main)
        except BaseException:
            self.close()
            raise
        self.session_steps = 0

    def close(self) -> None:
        """Close the metrics file and unlock the run directory."""
        self._close_metrics()
        if self.run_directory is not None:
            self.run_directory.release()

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _check_processes(self) -> None:
        config, group = self.config, self.group
        if config.nproc > 1 and not distributed.launched_by_torchrun():
            raise GptlabError(
                f"nproc={config.nproc}: start the processes with `gptlab train --nproc {config.nproc}` or torchrun; "
                f"train() runs in the calling process"
            )
        if distributed.launched_by_torchrun() and config.nproc not in (1, group.local_world_size):
            raise GptlabError(
                f"--nproc {config.nproc} contradicts torchrun's {group.local_world_size} processes per node"
            )
        if config.grad_accum % group.world_size:
            raise GptlabError(
                f"--grad-accum {config.grad_accum} must be a multiple of the number of processes ({group.world_size}): "
                f"it counts the micro-batches of a whole step, shared equally among them"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        group = self.group
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.elapsed_before = state["step"], state["tokens_seen"], state["elapsed"]
        self.best_val, self.last_eval_step = state["best_val_loss"], state["last_eval_step"]
        self.saved_step = self.step
        self.data_rng.bit_generator.state = state["data_rng"]
        saved = state["process_rng"]
        if group.rank < len(saved):
            restore_process_rng_state(saved[group.rank])
        else:
            torch.manual_seed(self.config.seed + group.rank + self.step)
        if group.is_main:
            if len(saved) != group.world_size:
                print(f"resuming with {group.world_size} processes where the run had {len(saved)}: the batches "
                      f"are the same, dropout draws are not", file=sys.stderr)
            for directory in (self.run_dir, self.run_dir / "best"):
                if directory.is_dir():
                    remove_temporaries(directory)
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
            if self.show:
                print(f"resuming {self.run_dir} at step {self.step}")

    def _prepare_for_training(self, model: GPT) -> torch.nn.Module:
        """The module the steps call: compiled if asked and possible, wrapped in DDP under torchrun."""
        step_model: torch.nn.Module = model
        if self.config.compile:
            reason = compile_unavailable(self.device)
            if reason:
                if self.group.is_main:
                    print(f"--compile: {reason}; training without it", file=sys.stderr)
            else:
                step_model = torch.compile(model)
        if self.group.active:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            step_model = DistributedDataParallel(step_model, device_ids=device_ids, gradient_as_bucket_view=True)
        return step_model

    def _warn_once_on_main(self, message: str) -> None:
        if self.group.is_main:
            tqdm.write(message, file=sys.stderr)

    def _peak_flops(self) -> float:
        """The matmul peak of all processes together, each probed while the others probe too."""
        distributed.barrier(self.group)
        rows = self.config.batch_size * self.config.block_size  # one micro-batch
        peak = matmul_peak(self.device, DTYPES[self.config.dtype], config=self.model.config, rows=rows)
        peak = torch.tensor([peak], dtype=torch.float64)
        total = distributed.all_reduce_sum(peak.to(self.device), self.group).item()
        if self.show:
            print(f"matmul peak ({self.config.dtype}, {self.group.world_size} process(es)): {total / 1e9:,.1f} GFLOP/s")
        return total

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        self.session_start = time.perf_counter()
        self.clock = self.elapsed_before  # the run's seconds so far, the same number in every process
        stopped_by = ""
        bar = tqdm(total=config.max_iters, initial=self.step, disable=not self.show, dynamic_ncols=True, desc="train")
        try:
            with StopSignals() as signals:
                while self.step < config.max_iters and not stopped_by:
                    if self._evaluation_due():
                        self._checkpoint(self._evaluate())
                    stopped_by = self._train_step(signals, bar)
                    bar.update(1)
                if stopped_by in ("SIGINT", "SIGTERM"):
                    self._checkpoint(None)
                    return self._result(stopped_by)
                self._checkpoint(self._evaluate())
        finally:
            bar.close()
            self._close_metrics()
        if self.group.is_main:
            plot_losses(self.run_dir / METRICS_FILE, self.run_dir / "loss.png")
            write_report(self._result(""), config, self.model, self.dataset, self.device)
        distributed.barrier(self.group)
        return self._result("")

    def _evaluation_due(self) -> bool:
        """Every eval_interval steps, once: a run resumed from an evaluated step does not repeat it."""
        interval = self.config.eval_interval
        return bool(interval) and self.step % interval == 0 and self.step > self.last_eval_step

    def _train_step(self, signals: StopSignals, bar: tqdm) -> str:
        """One optimizer step; returns why the run must stop now ("" to go on)."""
        config, group, device = self.config, self.group, self.device
        self.meter.start()
        lr = learning_rate(self._schedule_position(), config)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        x, y = self.dataset.get_batch("train", config.batch_size * config.grad_accum, config.block_size, self.data_rng)
        loss_sum = torch.zeros((), device=device)
        shares = distributed.share(x, y, group, self.accum)
        for i, (xb, yb) in enumerate(shares):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with self._gradient_sync(last=i == len(shares) - 1):
                with autocast_context(device, config.dtype):
                    loss = self._forward(xb, yb) / self.accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        # one exchange per step: the global loss, whether any process was signalled, and the clock, so
        # that every process takes the same decisions (stop, learning rate) at the same step
        local = [signals.received == "SIGINT", signals.received == "SIGTERM", self.elapsed()]
        report = torch.cat([loss_sum.double().reshape(1), torch.tensor(local, dtype=torch.float64, device=device)])
        loss_value, sigint, sigterm, clock = distributed.all_reduce_sum(report, group).tolist()
        loss_value /= group.world_size
        self.clock = clock / group.world_size
        time_up = bool(config.max_time) and self.clock >= config.max_time

        grad_norm = None
        if math.isfinite(loss_value) and config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip).item()
        nonfinite = self._nonfinite(loss_value, grad_norm)
        if not nonfinite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += x.numel()
        if self.session_steps == 0:
            self.meter.cancel()  # the first step pays for warm-up (and compilation): not counted
        else:
            self.meter.stop(x.numel(), x.numel() * flops_per_token(self.model.config, x.size(1)))
        self.session_steps += 1
        if nonfinite:
            self._log({"step": self.step, "skipped": nonfinite, "lr": lr})
        elif self.step % config.log_interval == 0 or self.step == config.max_iters:
            self._log_step(loss_value, lr, grad_norm, bar)
        else:
            self._log({"step": self.step, "lr": lr})  # every step's learning rate, for the schedule's record
        if sigint or sigterm:
            return "SIGINT" if sigint else "SIGTERM"
        return "max_time" if time_up else ""

    def _schedule_position(self) -> float:
        """The step the learning-rate schedule is at: this step, or with decay_by_time, the share of
        the time budget used, mapped onto the decay's steps.

        Warmup always counts steps. A wall-clock decay ends exactly when the budget does, however fast
        the machine runs; the price is that such a run cannot be repeated (or resumed) step for step.
        """
        config = self.config
        if not config.decay_by_time or self.step < config.warmup_iters:
            return self.step
        used = min(1.0, self.clock / config.max_time)  # as agreed at the end of the previous step
        decay_end = config.lr_decay_iters or config.max_iters
        return config.warmup_iters + used * (decay_end - config.warmup_iters)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.config.compile or self.session_steps > 0:
            return self.step_model(x, y).loss
        try:  # the first call compiles: turn a toolchain failure into one clear line
            return self.step_model(x, y).loss
        except torch._dynamo.exc.TorchDynamoException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GptlabError(f"--compile: torch.compile failed ({first}); train without --compile") from None

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on a step's last micro-batch only; the others just accumulate."""
        if isinstance(self.step_model, DistributedDataParallel) and not last:
            return self.step_model.no_sync()
        return contextlib.nullcontext()

    def _nonfinite(self, loss: float, grad_norm: float | None) -> str:
        """"" for a healthy step; otherwise what went wrong, after stopping the run if so configured.

        The optimizer has not stepped yet, so the weights are still those of the last good step. With
        float16 an infinite gradient is the scaler's business (it skips the step and lowers the scale).
        """
        if not math.isfinite(loss):
            what = f"the training loss is {loss}"
        elif grad_norm is not None and not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            what = f"the gradient norm is {grad_norm}"
        else:
            return ""
        if self.config.on_nonfinite == "skip":
            return what
        self._raise_nonfinite(f"{what} at step {self.step + 1}")
        return what  # unreachable: _raise_nonfinite raises

    def _raise_nonfinite(self, what: str) -> None:
        if self.saved_step >= 0:
            kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.run_dir}; continue it "
                    f"with --resume (perhaps with a lower --lr)")
        else:
            kept = "no checkpoint had been written yet"
        raise GptlabError(f"{what}; training stopped and {kept}, or pass --on-nonfinite skip to skip such steps")

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier sessions included: --max-time budgets the whole run."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    # --- evaluation, checkpoints, logs ------------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        self.losses = estimate_loss(self.model, self.dataset, self.config, self.device, self.step, self.group)
        self.last_eval_step = self.step
        self._log({"step": self.step, "val_loss": self.losses["val"], "train_eval_loss": self.losses["train"]})
        if not math.isfinite(self.losses["val"]):
            self._raise_nonfinite(f"the validation loss is {self.losses['val']} at step {self.step}")
        return self.losses

    def _checkpoint(self, losses: dict[str, float] | None) -> None:
        """Write the run directory; every process takes part, because each has its own random state."""
        rng_states = distributed.gather_to_all(process_rng_state(), self.group)
        improved = losses is not None and losses["val"] < self.best_val
        if improved:
            self.best_val = losses["val"]
        if self.group.is_main:
            if improved:
                save_model(self.model, self.run_dir / "best")
                self.tokenizer.save(self.run_dir / "best")
            save_training_state(self.run_dir, {
                "step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed(),
                "best_val_loss": self.best_val, "last_eval_step": self.last_eval_step,
                "model_config": self.model.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "data_rng": self.data_rng.bit_generator.state, "process_rng": rng_states,
            })
            save_model(self.model, self.run_dir)
        # no process leaves before rank 0 has written: torchrun stops every worker once one has exited
        distributed.barrier(self.group)
        self.saved_step = self.step

    def _log(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def _log_step(self, loss: float, lr: float, grad_norm: float | None, bar: tqdm) -> None:
        row: dict[str, Any] = {"step": self.step, "loss": loss, "lr": lr}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        tokens_per_s, mfu = self.meter.report()
        if tokens_per_s:
            row.update(tokens_per_s=round(tokens_per_s, 1), mfu=round(mfu, 6))
            postfix.update(tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
        self._log(row)
        bar.set_postfix(postfix, refresh=False)

    def _result(self, stopped_by: str) -> TrainResult:
        return TrainResult(
            self.run_dir, self.step, self.losses["train"], self.losses["val"], self.best_val, self.elapsed(),
            self.tokens_seen, stopped_by,
        )


def train(
    config: TrainConfig, *, overwrite: bool = False, resume: bool = False, show_progress: bool = True
) -> TrainResult:
    """Train one model as `config` says and return where it went and how well it did.

    Under torchrun every process calls this; rank 0 alone shows progress and writes the run directory.
    """
    device = resolve_device(config.device)
    if config.dtype != "auto":
        autocast_context(device, config.dtype)  # refuse an impossible dtype before touching the run directory
    group = distributed.setup(device)
    trainer = None
    try:
        device = distributed.process_device(device, group)
        trainer = Trainer(config, group, device, overwrite=overwrite, resume=resume, show_progress=show_progress)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        # DDP sits in a reference cycle of torch's own, so its reducer (and the gloo state it holds)
        # would wait for the cyclic collector, perhaps until interpreter shutdown, after the process
        # group is gone, where gloo's teardown can abort the process (seen once: exit 134 after a
        # SIGTERM). Free it now, while the group is alive.
        del trainer
        if group.active:
            gc.collect()
        distributed.teardown(group)
