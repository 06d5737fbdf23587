"""The training loop: AdamW, warmup + cosine schedule, evaluation, checkpoints, metrics and a loss plot.

A run directory holds the model as a Hugging Face checkpoint (`config.json`, `model.safetensors`),
the tokenizer, `train_config.json`, gptlab's own resumable state (`training_state.pt`),
`metrics.jsonl`, `loss.png`, and `best/` (the model with the lowest validation loss so far).
The top-level model is always the latest one, consistent with `training_state.pt`, so `--resume`
continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .adder import AdderDataset
from .checkpoint import atomic_write_bytes, atomic_write_json, load_model, save_model
from .config import TrainConfig
from .data import TokenDataset, default_corpus_files, prepare
from .errors import GptlabError
from .model import GPT
from .optim import configure_optimizer, learning_rate

STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
DEFAULT_DATA_DIR = Path("data/shakespeare-char")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    seconds: float
    tokens_seen: int


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
    """bf16/fp16 autocast for the forward pass; float32 runs without it."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise GptlabError("--dtype float16 needs a CUDA device; on a CPU use bfloat16")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def resolve_data(config: TrainConfig) -> Path:
    """The prepared data directory; with none given, the built-in Shakespeare corpus, prepared once."""
    if config.data:
        return Path(config.data)
    if not (DEFAULT_DATA_DIR / "meta.json").is_file():
        print(f"preparing the built-in corpus (complete works of Shakespeare) in {DEFAULT_DATA_DIR}")
        prepare([str(p) for p in default_corpus_files()], "char", DEFAULT_DATA_DIR)
    return DEFAULT_DATA_DIR


def resolve_run_dir(config: TrainConfig, overwrite: bool, resume: bool) -> Path:
    """The run directory, refusing to clobber an existing run unless `overwrite` says so."""
    if not config.out:
        name = config.preset or "run"
        n = 1
        while Path("runs", f"{name}-{n}").exists():
            n += 1
        return Path("runs", f"{name}-{n}")
    run_dir = Path(config.out)
    if resume:
        if not (run_dir / STATE_FILE).is_file():
            raise GptlabError(f"{run_dir}: no {STATE_FILE} to resume from")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise GptlabError(f"{run_dir} already holds a run; pass --overwrite to replace it or --resume to continue it")
        shutil.rmtree(run_dir)
    return run_dir


def save_training_state(run_dir: Path, state: dict[str, Any]) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run_dir / STATE_FILE, buffer.getvalue())


def load_training_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GptlabError(f"{path}: cannot read the training state ({exc})") from None


@torch.no_grad()
def estimate_loss(
    model: GPT, dataset: TokenDataset, config: TrainConfig, device: torch.device, step: int
) -> dict[str, float]:
    """Mean loss over `eval_iters` random batches per split, drawn from an RNG of their own."""
    was_training = model.training
    model.eval()
    losses = {}
    for split in ("train", "val"):
        rng = np.random.default_rng([config.seed, step, split == "val"])
        total = 0.0
        for _ in range(config.eval_iters):
            x, y = dataset.get_batch(split, config.batch_size, config.block_size, rng)
            with autocast_context(device, config.dtype):
                total += model(x.to(device), y.to(device)).loss.item()
        losses[split] = total / config.eval_iters
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


def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> GPT:
    if config.init_from:
        model = load_model(config.init_from)
        if model.config.vocab_size != vocab_size:
            raise GptlabError(
                f"--init-from {config.init_from}: its vocabulary has {model.config.vocab_size} tokens, "
                f"the data's tokenizer {vocab_size}"
            )
        if config.block_size < model.config.block_size:
            model.crop_block_size(config.block_size)
        elif config.block_size > model.config.block_size:
            raise GptlabError(
                f"--block-size {config.block_size} exceeds the context of {config.init_from} ({model.config.block_size})"
            )
        model.config.dropout = config.dropout
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.dropout
        return model.to(device)
    return GPT(config.model_config(vocab_size)).to(device)


def train(
    config: TrainConfig, *, overwrite: bool = False, resume: bool = False, show_progress: bool = True
) -> TrainResult:
    """Train one model as `config` says and return where it went and how well it did."""
    device = resolve_device(config.device)
    run_dir = resolve_run_dir(config, overwrite, resume)
    if resume:
        saved = json.loads((run_dir / TRAIN_CONFIG_FILE).read_text())
        explicit = {k: v for k, v in config.to_dict().items() if k in ("max_iters", "max_time", "device")}
        config = TrainConfig(**{**saved, **explicit, "out": str(run_dir)})
    if config.task == "adder":
        dataset = AdderDataset()
    else:
        data_dir = resolve_data(config)
        config.data = str(data_dir)
        dataset = TokenDataset(data_dir)
    for split in ("train", "val"):
        dataset.check_length(split, config.block_size)
    tokenizer = dataset.tokenizer

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if resume:
        model = load_model(run_dir).to(device)
    else:
        model = build_model(config, tokenizer.vocab_size, device)
    optimizer = configure_optimizer(model, config, device)
    step, best_val, tokens_seen, elapsed_before = 0, float("inf"), 0, 0.0
    if resume:
        state = load_training_state(run_dir)
        optimizer.load_state_dict(state["optimizer"])
        step, best_val = state["step"], state["best_val_loss"]
        tokens_seen, elapsed_before = state["tokens_seen"], state["elapsed"]
        rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / TRAIN_CONFIG_FILE, config.to_dict())
        tokenizer.save(run_dir)

    def checkpoint(val_loss: float | None) -> None:
        nonlocal best_val
        save_model(model, run_dir)
        save_training_state(run_dir, {
            "step": step, "best_val_loss": min(best_val, val_loss or best_val),
            "tokens_seen": tokens_seen, "elapsed": elapsed_before + time.perf_counter() - start,
            "optimizer": optimizer.state_dict(), "data_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        })
        if val_loss is not None and val_loss < best_val:
            best_val = val_loss
            save_model(model, run_dir / "best")
            tokenizer.save(run_dir / "best")

    tokens_per_step = config.batch_size * config.block_size * config.grad_accum
    metrics = open(run_dir / METRICS_FILE, "a")
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=config.max_iters, initial=step, disable=not show_progress, dynamic_ncols=True, desc="train")
    losses = {"train": float("nan"), "val": float("nan")}
    last_loss = float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while step < config.max_iters:
            if config.max_time and time.perf_counter() - start >= config.max_time:
                break
            if config.eval_interval and step % config.eval_interval == 0 and step > 0:
                losses = estimate_loss(model, dataset, config, device, step)
                metrics.write(json.dumps({"step": step, "val_loss": losses["val"], "train_eval_loss": losses["train"]}) + "\n")
                metrics.flush()
                checkpoint(losses["val"])
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                x, y = dataset.get_batch("train", config.batch_size, config.block_size, rng)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast_context(device, config.dtype):
                    loss = model(x, y).loss / config.grad_accum
                loss.backward()
                loss_sum += loss.item()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss_sum):
                raise GptlabError(f"the loss became {loss_sum} at step {step}; the last good checkpoint is kept")
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            last_loss = loss_sum
            bar.update(1)
            if step % config.log_interval == 0 or step == config.max_iters:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                metrics.write(json.dumps({"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tok_s}) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
    finally:
        bar.close()
        metrics.close()
    losses = estimate_loss(model, dataset, config, device, step)
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps({"step": step, "val_loss": losses["val"], "train_eval_loss": losses["train"]}) + "\n")
    checkpoint(losses["val"])
    plot_losses(run_dir / METRICS_FILE, run_dir / "loss.png")
    seconds = elapsed_before + time.perf_counter() - start
    return TrainResult(run_dir, step, losses["train"], losses["val"], best_val, seconds, tokens_seen)
