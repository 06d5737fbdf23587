"""Model and training configuration, and the named presets.

Two dataclasses, one per concern: `GPTConfig` describes the network (what a checkpoint needs to be
rebuilt), `TrainConfig` describes one training run (what `gptlab train` needs to reproduce it).
Presets are plain dictionaries of overrides so a user can read them at a glance.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import GptlabError


@dataclass
class GPTConfig:
    """The shape of a GPT-2 network. Field names follow nanoGPT; `checkpoint` maps them to HF's."""

    vocab_size: int = 50257
    block_size: int = 1024  # the context length, HF's n_positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm; False is a gptlab-only option
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GptlabError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise GptlabError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The published GPT-2 sizes (Radford et al. 2019, Table 2, with the released vocabulary and context).
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# Small shapes for a laptop CPU; vocab_size and block_size come from the data and the run.
SMALL_SIZES: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384),
}


def model_preset(name: str, **overrides: Any) -> GPTConfig:
    """A `GPTConfig` for a named size; GPT-2 sizes come with GPT-2's vocabulary and context."""
    if name in GPT2_SIZES:
        base: dict[str, Any] = dict(vocab_size=50257, block_size=1024, **GPT2_SIZES[name])
    elif name in SMALL_SIZES:
        base = dict(SMALL_SIZES[name])
    else:
        known = ", ".join([*GPT2_SIZES, *SMALL_SIZES])
        raise GptlabError(f"unknown model size {name!r}; known sizes: {known}")
    base.update(overrides)
    return GPTConfig(**base)


OPTIMIZERS = ("adamw", "adam", "radam", "sgd", "muon")
SCHEDULES = ("cosine", "noam", "linear", "constant")
TASKS = ("text", "adder")
PRECISIONS = ("float32", "bfloat16", "float16", "auto")
FIELD_CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "task": TASKS, "dtype": PRECISIONS}  # closed sets


@dataclass
class TrainConfig:
    """Everything one training run needs. Every field is also a `gptlab train --field-name` option."""

    # data and output
    data: str = ""  # a prepared data directory (gptlab prepare); empty means the built-in corpus
    task: str = "text"  # text: a prepared corpus; adder: two-digit addition, generated in memory
    out: str = ""  # the run directory; empty means runs/<preset>-N, the first free N
    init_from: str = ""  # a run or Hugging Face GPT-2 directory to fine-tune from
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    max_time: float = 0.0  # wall-clock budget in seconds for the loop; 0 means no budget
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 means max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw, adam, radam, sgd, muon (muon for the hidden matrices, adamw for the rest)
    schedule: str = "cosine"  # cosine, noam, linear, constant; each warms up to lr
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    sample_tokens: int = 300  # characters/tokens of text printed at the end (0: none)
    # system
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "float32"  # float32, bfloat16, float16, or auto: bfloat16 where this device runs it fast
    compile: bool = False  # torch.compile the model (falls back to eager, with a message, where it cannot work)
    nproc: int = 1  # processes on this machine: gptlab train --nproc N runs itself under torchrun (DDP)
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (keeping the last good checkpoint) or skip the step
    decay_by_time: bool = False  # with max_time: decay the lr over the time budget, not the steps (warmup: steps)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            bias=self.bias,
        )

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "max_iters", "block_size", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.eval_interval < 0 or self.warmup_iters < 0 or self.max_time < 0:
            raise GptlabError("--eval-interval, --warmup-iters and --max-time must not be negative")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise GptlabError(f"learning rates must satisfy 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if not self.init_from:
            self.model_config(vocab_size=1)  # the model's shape, checked before any data is read
        if self.nproc < 1:
            raise GptlabError(f"--nproc must be at least 1, got {self.nproc}")
        if self.grad_accum % self.nproc:
            raise GptlabError(
                f"--grad-accum {self.grad_accum} must be a multiple of --nproc {self.nproc}: it counts the "
                f"micro-batches of a whole step, shared equally among the processes"
            )
        if self.on_nonfinite not in ("stop", "skip"):
            raise GptlabError(f"--on-nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if self.decay_by_time and not self.max_time:
            raise GptlabError("--decay-by-time needs --max-time, the budget to decay the learning rate over")
        for name, choices in FIELD_CHOICES.items():
            if getattr(self, name) not in choices:
                raise GptlabError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


# Named training presets: overrides of TrainConfig's defaults.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # What `gptlab train` with no arguments runs: a character-level model of the complete works of
    # Shakespeare, 4 minutes of training on any CPU. The learning rate decays over those 4 minutes, so a
    # slow laptop and a fast workstation both end the schedule as the budget ends. Muon (weight decay
    # 0.5, as in shakespeare-char-cpu) against AdamW (0.1), one run each on a 2-core CPU: sampled
    # validation loss 1.538 against 1.612, perplexity 4.83 against 5.32, in a quarter fewer steps.
    "shakespeare-char-default": dict(
        n_layer=4, n_head=4, n_embd=192, block_size=128, batch_size=16, dropout=0.0, dtype="auto",
        optimizer="muon", weight_decay=0.5,
        max_iters=100_000, max_time=240.0, decay_by_time=True, lr=2e-3, min_lr=2e-4, warmup_iters=100,
        eval_interval=500, eval_iters=10, beta2=0.99,
    ),
    # The textbook's adder: two-digit addition, 15+57=072, data generated in memory; loss on the answer
    # digits only; graded by exact match on 1,000 held-out problems. Sized for >= 99% within 2 minutes
    # on 2 CPU cores (benchmarks/adder.py measures it).
    "adder": dict(
        task="adder", n_layer=2, n_head=4, n_embd=128, block_size=8, batch_size=256, dropout=0.0,
        max_iters=400, lr=3e-3, min_lr=3e-4, warmup_iters=50, eval_interval=100, eval_iters=4,
        log_interval=10, sample_tokens=0,
    ),
    # benchmarks/shakespeare.py: the best validation loss after 5 minutes of a 2-core CPU. Two
    # single-threaded processes outrun one process of two threads on matrices this small, and bf16
    # (where the CPU has bf16 instructions) adds a quarter to the tokens per second. torch.compile adds
    # another quarter for about 30 s of compiling, which counts against the budget (it falls back to eager,
    # with a message, without a C++ compiler). Muon for the blocks' matrices costs a tenth of the tokens
    # per second (its Newton-Schulz products) and reaches a lower loss per step by far; it then overfits
    # (training loss 1.17 against 1.49), which a weight decay of 0.5 holds back. The learning rate decays
    # over the time budget, so it reaches min_lr as the budget ends however busy the machine is;
    # max_iters only caps the run.
    # Measured alternatives (whole validation split, 5 minutes, one run each unless several figures;
    # runs of one configuration spread by about 0.02). This preset: 1.470, 1.475, 1.478, 1.477.
    # With muon: weight decay 0.1 1.493, 1.0 1.487;
    # lr 5e-3 1.470; 4 layers 1.496; 24 windows a step 1.473; dropout 0.1 1.707 (inductor's dropout
    # halves the tokens per second). With adamw (weight decay 0.1): 1.506 to 1.526 over five runs; lr
    # 4e-3 1.511; weight decay 0 1.520, 0.25 1.509; linear decay to 0 1.510; 2 heads 1.530, 8 heads
    # 1.545. Eager adamw: 24 windows a step 1.523, 48 windows 1.536; 4 layers 1.527, 6 layers 1.564;
    # context 256 1.552. Five minutes are compute-bound: a smaller model that sees more tokens does better.
    "shakespeare-char-cpu": dict(
        n_layer=3, n_head=4, n_embd=128, block_size=128, batch_size=16, grad_accum=2, nproc=2, dropout=0.0,
        dtype="auto", compile=True, optimizer="muon", weight_decay=0.5,
        max_iters=100_000, max_time=300.0, decay_by_time=True, lr=3e-3, min_lr=3e-5, warmup_iters=100,
        eval_interval=500, eval_iters=10, beta2=0.99,
    ),
    # nanoGPT's documented CPU recipe, for comparison.
    "nanogpt-cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
        max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=20,
    ),
}


def train_config_fields() -> list[dataclasses.Field]:
    return list(fields(TrainConfig))


def build_train_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then the preset, then a JSON config file, then command-line overrides: later wins."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in TRAIN_PRESETS:
            raise GptlabError(f"unknown preset {preset!r}; known presets: {', '.join(TRAIN_PRESETS)}")
        values.update(TRAIN_PRESETS[preset])
        values["preset"] = preset
    if config_file:
        values.update(_read_config_file(Path(config_file)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GptlabError(f"unknown training option(s): {', '.join(unknown)}")
    config = TrainConfig(**values)
    config.validate()
    return config


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GptlabError(f"config file not found: {path}")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptlabError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise GptlabError(f"config file {path} must hold a JSON object of option: value")
    return values


@dataclass(frozen=True)
class ServerLimits:
    """What `gptlab serve` accepts and holds; each field is a `gptlab serve` option.

    Kept here, not in serve/, so the command line can show the defaults without importing the
    web stack.
    """

    max_tokens: int = 256  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20  # larger request bodies are refused with 413 before they are parsed
    max_choices: int = 16  # prompts x n in one request
    max_batch: int = 16  # sequences the engine advances together in one step
    max_queue: int = 64  # sequences waiting for a place in the batch; more are refused with 429
    kv_cache_mb: int = 1024  # the KV cache's budget; sequences wait while the running ones fill it
