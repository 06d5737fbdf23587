"""What one training run is: `TrainConfig`, its options' checks and help lines, and the named presets.

Every field of TrainConfig is a `gptlab train --field-name` option, and its `help` is that option's
help line, so the options, their checks and their documentation come from one place. A config is
built once, from the defaults, a preset, a JSON file and the command line (`build_train_config`), and
never changed afterwards (it is frozen): set-up resolves what the run learns later (the data path, the
dtype `auto` chose, a pretrained model's shape, the run directory) into a new config with
`dataclasses.replace`, which is what train_config.json records.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import GPTConfig
from ..errors import EnvironmentProblem, GptlabError
from ..fileio import describe_os_error

OPTIMIZERS = ("adamw", "adam", "radam", "sgd", "muon")
SCHEDULES = ("cosine", "noam", "linear", "constant")
TASKS = ("text", "adder", "chat", "classify", "choice")
HEAD_TASKS = ("classify", "choice")  # GPT-1's fine-tuning: a task head on a pretrained model (gptlab.heads)
PRECISIONS = ("float32", "bfloat16", "float16", "auto")
ON_NONFINITE = ("stop", "skip")
FIELD_CHOICES = {  # the closed sets, shown in the help and checked by TrainConfig.validate
    "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "task": TASKS, "dtype": PRECISIONS, "on_nonfinite": ON_NONFINITE,
}


def option(default: Any, help: str) -> Any:
    """A TrainConfig field with its help line: the one source of `gptlab train --help`."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Every field is also a `gptlab train --field-name` option,
    whose help line is the field's `help` (units and meaning) and, for a closed set, its choices."""

    # data and output
    data: str = option("", "a prepared data directory (gptlab prepare); empty: the built-in Shakespeare corpus; "
                           "classify and choice: a file of labelled examples (every tenth held out for validation), "
                           "a directory with train and val files, or a built-in task's name")
    task: str = option("text", "text: a prepared corpus; adder: two-digit addition, generated in memory; chat: "
                               "--data is a JSON-lines file of conversations, the loss on the assistant's tokens; "
                               "classify: a linear head on the last token learns --data's labels (JSON lines or CSV "
                               "with text and label); choice: multiple choice (JSON lines with context, choices and "
                               "label, the right choice's index), each choice scored at its last token (GPT-1 and "
                               "GPT2DoubleHeadsModel); both fine-tune --init-from")
    lm_loss_weight: float = option(0.0, "classify and choice: the weight of GPT-1's auxiliary language-modelling "
                                        "loss on the inputs, added to the task's loss. GPT-1 used 0.5 and found it "
                                        "helps large data sets and not small ones (its sec. 5), and it costs the LM "
                                        "head's product at every position, so 0: off")
    hf_dataset: str = option("", "with --task chat: a Hugging Face dataset of conversations instead of --data (a "
                                 "save_to_disk directory, data files or a Hub name; needs the datasets library)")
    hf_config: str = option("", "with --hf-dataset: the dataset's configuration (subset)")
    hf_split: str = option("train", "with --hf-dataset: the split to read")
    out: str = option("", "the run directory; empty: runs/<preset>-N, the first free N")
    init_from: str = option("", "a run or Hugging Face GPT-2 directory (or a GPT-2 size) to fine-tune from")
    # LoRA (Hu et al. 2021): with --init-from, train low-rank adapters of the frozen model
    lora_rank: int = option(0, "with --init-from: the rank r of LoRA adapters, trained alone while every weight of "
                               "the model stays frozen; the run saves the adapter as peft does; 0: no LoRA, train "
                               "every weight")
    lora_alpha: float = option(16.0, "LoRA's alpha: the update B A is scaled by alpha / r")
    lora_dropout: float = option(0.0, "dropout probability in [0, 1) on the input of the LoRA update")
    lora_targets: str = option("c_attn,c_proj,c_fc", "the layers LoRA adapts, comma-separated, by peft's names: "
                                                     "c_attn, c_proj (attn.c_proj and mlp.c_proj), c_fc, "
                                                     "attn.c_proj, mlp.c_proj")
    # model
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads per block; must divide --n-embd")
    n_embd: int = option(128, "width of the residual stream (channels)")
    block_size: int = option(64, "context length in tokens: the length of each training window")
    dropout: float = option(0.0, "dropout probability in [0, 1)")
    bias: bool = option(True, "biases in every Linear and LayerNorm, as GPT-2 (--no-bias: a gptlab-only variant)")
    # optimisation
    batch_size: int = option(12, "windows (sequences) per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step, over all processes: a step sees "
                                "batch_size * grad_accum windows")
    max_iters: int = option(2000, "optimizer steps: the run ends here (or at --max-time, if sooner)")
    max_time: float = option(0.0, "seconds of training (steps, periodic evaluations and checkpoints, summed "
                                  "over resumed sessions; not the set-up, nor the final evaluation and report); "
                                  "0: no limit")
    lr: float = option(1e-3, "peak learning rate, reached at the end of the warm-up")
    min_lr: float = option(1e-4, "learning rate at the end of the decay (cosine, linear)")
    warmup_iters: int = option(100, "optimizer steps of linear warm-up to --lr (unless --warmup-fraction)")
    warmup_fraction: float = option(0.0, "the warm-up as a share in [0, 1) of the schedule: of the decay's steps, "
                                         "or with --decay-by-time of --max-time; replaces --warmup-iters when > 0")
    lr_decay_iters: int = option(0, "optimizer steps at which the decay reaches --min-lr; 0: --max-iters")
    weight_decay: float = option(0.1, "weight decay of the matrices (decoupled in adamw and muon, an L2 term in "
                                         "adam, radam and sgd; biases and gains: none)")
    beta1: float = option(0.9, "Adam's first-moment decay in [0, 1) (sgd: its momentum)")
    beta2: float = option(0.99, "Adam's second-moment decay in [0, 1)")
    grad_clip: float = option(1.0, "clip the gradient's global L2 norm to this; 0: no clipping")
    optimizer: str = option("adamw", "muon: Muon for the blocks' matrices and AdamW for the rest")
    schedule: str = option("cosine", "learning-rate schedule after the warm-up (noam: Vaswani et al.)")
    decay_by_time: bool = option(False, "with --max-time: run the schedule (warm-up and decay) on the clock, "
                                        "ending as the time budget ends however fast the machine is")
    # evaluation and logging
    eval_interval: int = option(250, "optimizer steps between evaluations and checkpoints; 0: only at the end")
    eval_iters: int = option(20, "random batches per split in each evaluation")
    log_interval: int = option(10, "optimizer steps between logged losses")
    sample_tokens: int = option(300, "tokens (characters, for a char model) of text printed at the end; 0: none")
    eval_tasks: str = option("", "lm-eval tasks scored during training, comma-separated, e.g. hellaswag (the eval extra)")
    eval_tasks_every: int = option(0, "steps between task scores, at evaluations whose step it divides; 0: every evaluation")
    eval_tasks_limit: int = option(0, "documents per task in those scores; 0: all")
    eval_tasks_path: str = option("", "a directory of extra lm-eval task YAML files for --eval-tasks")
    # system
    seed: int = option(1337, "random seed (a non-negative integer) of the weights, batches and dropout")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    dtype: str = option("float32", "autocast precision (weights stay float32); auto: bfloat16 where this "
                                   "device runs it at least 1.5x faster")
    compile: bool = option(False, "torch.compile the model (falls back to eager, with a message, where it "
                                  "cannot work)")
    activation_checkpointing: bool = option(False, "keep only each block's input for the backward pass and "
                                                   "recompute the rest there: far less activation memory, about "
                                                   "a third more compute")
    adapt_threads: bool = option(False, "on a CPU, time the step at each thread count now and again and keep "
                                        "the fastest: on a busy machine one thread can step 3x faster than two "
                                        "(the last bits then depend on the count)")
    nproc: int = option(1, "processes on this machine: gptlab train --nproc N runs itself under torchrun (DDP)")
    on_nonfinite: str = option("stop", "a NaN/inf loss: stop (keeping the last good checkpoint) or skip the step")
    preset: str = option("", "named settings applied before --config and the options")

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
        """Refuse any value training cannot use, with one line naming the option; nothing is run or read."""
        for f in fields(self):
            check_type(f"--{f.name.replace('_', '-')}", getattr(self, f.name), f.type)
        positive = ("batch_size", "grad_accum", "max_iters", "block_size", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_interval", "warmup_iters", "lr_decay_iters", "sample_tokens", "max_time",
                     "weight_decay", "grad_clip", "seed", "eval_tasks_every", "eval_tasks_limit"):
            if getattr(self, name) < 0:
                raise GptlabError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.seed >= 2**63:
            raise GptlabError(f"--seed must be below 2**63, got {self.seed}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise GptlabError(f"learning rates must satisfy 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        for name in ("beta1", "beta2", "warmup_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise GptlabError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not self.init_from:
            self.model_config(vocab_size=1)  # the model's shape, checked before any data is read
        if self.nproc < 1:
            raise GptlabError(f"--nproc must be at least 1, got {self.nproc}")
        if self.grad_accum % self.nproc:
            raise GptlabError(
                f"--grad-accum {self.grad_accum} must be a multiple of --nproc {self.nproc}: it counts the "
                f"micro-batches of a whole step, shared equally among the processes"
            )
        self.validate_lora()
        self.validate_task()
        if self.eval_tasks_path and not Path(self.eval_tasks_path).is_dir():
            raise GptlabError(f"--eval-tasks-path {self.eval_tasks_path}: no such directory of lm-eval task files")
        if self.decay_by_time and not self.max_time:
            raise GptlabError("--decay-by-time needs --max-time, the budget to decay the learning rate over")
        if self.preset and self.preset not in TRAIN_PRESETS:  # e.g. a resumed run's train_config.json
            raise GptlabError(f"--preset must be one of {', '.join(TRAIN_PRESETS)}, got {self.preset!r}")
        for name, choices in FIELD_CHOICES.items():
            if getattr(self, name) not in choices:
                raise GptlabError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                  f"got {getattr(self, name)!r}")

    def validate_task(self) -> None:
        """What a task head needs: a pretrained model to fine-tune and labelled data."""
        if self.lm_loss_weight < 0:
            raise GptlabError(f"--lm-loss-weight must not be negative, got {self.lm_loss_weight}")
        if self.task not in HEAD_TASKS:
            if self.lm_loss_weight:
                raise GptlabError(f"--lm-loss-weight weighs GPT-1's auxiliary LM loss beside a task head: it applies "
                                  f"to --task classify or choice, not {self.task}")
            return
        if not self.init_from:
            raise GptlabError(f"--task {self.task} fine-tunes a pretrained model, as GPT-1 does (a head trained with "
                              f"a random body learns nothing a language model knows): give --init-from MODEL")
        if not self.data:
            raise GptlabError(f"--task {self.task} needs --data: a file of labelled examples (JSON lines or CSV), a "
                              f"directory with train and val files, or a built-in task's name")
        if self.hf_dataset:
            raise GptlabError(f"--hf-dataset is for --task chat; --task {self.task} reads --data")
        if self.eval_tasks:
            raise GptlabError(f"--eval-tasks scores a language model; a --task {self.task} run is scored by its "
                              f"validation accuracy")

    def validate_lora(self) -> None:
        if self.lora_rank < 0:
            raise GptlabError(f"--lora-rank must be at least 1 (or 0: no LoRA), got {self.lora_rank}")
        if not self.lora_rank:
            return
        if not self.init_from:
            raise GptlabError("--lora-rank adapts a pretrained model: give --init-from MODEL (a run, a Hugging Face "
                              "GPT-2 directory or a GPT-2 size)")
        if self.optimizer == "muon":
            raise GptlabError("--optimizer muon orthogonalises whole matrices, not LoRA's low-rank factors; "
                              "choose adamw, adam, radam or sgd with --lora-rank")
        if self.lora_alpha <= 0:
            raise GptlabError(f"--lora-alpha must be above 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise GptlabError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        from ..lora import parse_targets  # torch: only when a run is checked, never for the parser

        parse_targets(self.lora_targets)


_TYPE_NAMES = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}


def check_type(name: str, value: Any, kind: str) -> None:
    """Refuse a value of the wrong type (a config file's "4" for an int) or a NaN/infinite float."""
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        raise GptlabError(f"{name} must be {_TYPE_NAMES[kind]}, got {value!r}")


# Tiny Shakespeare in 5 minutes on 2 CPU cores; its runs are recorded at "shakespeare-char-cpu" below.
_SHAKESPEARE_CPU: dict[str, Any] = dict(
    n_layer=3, n_head=4, n_embd=128, block_size=128, batch_size=16, grad_accum=2, nproc=2, dropout=0.0,
    dtype="auto", compile=True, optimizer="muon", weight_decay=0.5,
    max_iters=100_000, max_time=300.0, decay_by_time=True, lr=3e-3, min_lr=3e-5, warmup_fraction=0.04,
    eval_interval=500, eval_iters=10, beta2=0.99,
)
# Named training presets: overrides of TrainConfig's defaults.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # What `gptlab train` with no arguments runs: a character-level model of the complete works of
    # Shakespeare, 4 minutes of training on any CPU, the warm-up (5% of the time) and the decay on the
    # clock, so that a slow laptop and a fast workstation both end the schedule as the budget ends.
    # Sized for a busy machine too: a run starved of CPU takes only a few hundred steps, and the loss of
    # a character model sits near a bigram's (2.5 nats) until the attention learns to copy, which a
    # small model reaches in far fewer FLOPs. Measured at load 4 to 8 (one thread, --adapt-threads's
    # choice there), Muon, validation loss: 4 layers 128 wide, context 64, lr 6e-3: 2.16 at step 200,
    # 2.05 at 400; at lr 3e-3: 2.36, 2.05; the earlier 4 layers 192 wide, context 128 (4.6x the FLOPs a
    # step), lr 5e-3: 2.05 at step 200; at lr 2e-3 still 2.42 at step 150, about the bigram's 2.53.
    # The recipe is "Muon where it pays", measured at set-up (train/setup.py choose_muon): its
    # iterations run in bf16 only where the CPU multiplies bf16 natively and faster, else in float32 (on
    # an AVX2 CPU Muon's bf16 step took 1.2 s against 0.13 s for forward and backward: 150 steps in 4
    # minutes, perplexity 12 against the bigram's 12.76); where even so its step costs more than the
    # rest of the step, the run takes AdamW with the same lr and weight decay (AdamW, float32, on that
    # CPU at load 3 to 6: 1,295 steps, perplexity 6.36).
    "shakespeare-char-default": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, dropout=0.0, dtype="auto",
        optimizer="muon", weight_decay=0.5, adapt_threads=True,
        max_iters=100_000, max_time=240.0, decay_by_time=True, lr=5e-3, min_lr=5e-4, warmup_fraction=0.05,
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
    # max_iters only caps the run. The warm-up is 4% of the time after the first (compiling) step:
    # about the 100 steps the figures below were measured with, when the warm-up counted steps.
    # Measured alternatives (whole validation split, 5 minutes, one run each unless several figures;
    # runs of one configuration spread by about 0.02). This preset: 1.470, 1.475, 1.478, 1.477.
    # With muon: weight decay 0.1 1.493, 1.0 1.487;
    # lr 5e-3 1.470; 4 layers 1.496; 24 windows a step 1.473; dropout 0.1 1.707 (inductor's dropout
    # halves the tokens per second). With adamw (weight decay 0.1): 1.506 to 1.526 over five runs; lr
    # 4e-3 1.511; weight decay 0 1.520, 0.25 1.509; linear decay to 0 1.510; 2 heads 1.530, 8 heads
    # 1.545. Eager adamw: 24 windows a step 1.523, 48 windows 1.536; 4 layers 1.527, 6 layers 1.564;
    # context 256 1.552. Five minutes are compute-bound: a smaller model that sees more tokens does better.
    # Without bf16 in hardware (AVX2) the same recipe runs in float32: dtype auto takes float32, Muon
    # iterates in float32 (its bf16 step was 9x a forward and backward there, 2.2067 in 5 minutes), and
    # AdamW replaces Muon where even then it does not pay (as for the demo preset).
    "shakespeare-char-cpu": _SHAKESPEARE_CPU,
    # The same recipe, wider and deeper, for a CPU whose bf16 products run 4x or more faster than its
    # float32 ones (AMX): there the products stop being the step's cost, and a model of 2.9x the
    # parameters trains at half the tokens per second. Measured on an Intel Xeon with AMX (2 cores,
    # whole validation split, 5 minutes, one run each): this preset 1.4562 (31k tokens/s, 2,060 steps);
    # 4 x 256 wide 1.4615 (21k tokens/s); shakespeare-char-cpu 1.4820 (60k tokens/s, 15.7 epochs:
    # training loss 1.15, it overfits), with weight decay 1.0 1.4766. benchmarks/shakespeare.py takes
    # this preset where it measures that ratio.
    "shakespeare-char-amx": dict(_SHAKESPEARE_CPU, n_layer=4, n_head=6, n_embd=192, weight_decay=1.0),
    # GPT-2 124M pretrained as Karpathy's build-nanogpt train_gpt2.py does it on FineWeb-Edu 10B, the
    # PyTorch twin of llm.c's 124M run (karpathy/llm.c discussion #481): GPT-3's hyperparameters for
    # its 125M model. 2**19 = 524,288 tokens a step (16 windows of 1,024, 32 micro-batches over all
    # GPUs: 4 each on 8), 19,073 steps = 10B tokens, one epoch; warm-up over GPT-3's 375M tokens (715
    # steps), cosine decay to a tenth; AdamW with betas (0.9, 0.95), weight decay 0.1, clip 1.0; bf16
    # autocast and TF32 on a GPU, torch.compile. Followed rather than nanoGPT's OpenWebText recipe
    # (600k steps of 0.5M tokens, about 4 days on 8 A100s) because it reaches GPT-2's quality in 10B
    # tokens, a 30th of the compute. An 80 GB GPU fits --batch-size 64 --grad-accum 8 (same batch).
    "gpt2-124m": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, bias=True,
        batch_size=16, grad_accum=32, max_iters=19_073, lr=6e-4, min_lr=6e-5, warmup_iters=715,
        weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, optimizer="adamw", schedule="cosine",
        dtype="auto", compile=True, eval_interval=250, eval_iters=20, log_interval=10, sample_tokens=64,
    ),
    # nanoGPT's documented CPU recipe, for comparison.
    "nanogpt-cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
        max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, eval_iters=20,
    ),
}


def build_train_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then `base` (a resumed run's saved options), the preset, a JSON config file, then
    command-line overrides (None: not given): later wins."""
    values: dict[str, Any] = dict(base or {})
    if preset:
        values.update(_preset(preset, "--preset"))
    from_file: dict[str, Any] = {}
    if config_file:
        from_file = _read_config_file(Path(config_file))
        if from_file.get("preset"):  # a preset the file names applies first, the file's own values after it
            values.update(_preset(from_file["preset"], f"config file {config_file}: preset"))
        values.update(from_file)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    check_lora_options(given, values.get("lora_rank", 0))
    if "lm_loss_weight" in given and values.get("task", "text") not in HEAD_TASKS:
        raise GptlabError(f"--lm-loss-weight weighs GPT-1's auxiliary LM loss beside a task head: it applies to "
                          f"--task classify or choice, not {values.get('task', 'text')}")
    return checked_train_config(values)


def check_lora_options(given: dict[str, Any], rank: int) -> None:
    """LoRA's options typed without a rank to use them with: one line, not silently ignored. (A --config
    file may hold them, as a run's train_config.json does, with lora_rank 0: no LoRA.)"""
    if given.get("lora_rank") == 0:
        raise GptlabError("--lora-rank must be at least 1; leave it out to fine-tune every weight")
    others = sorted(k for k in given if k.startswith("lora_") and k != "lora_rank")
    if others and not rank:
        flags = ", ".join("--" + k.replace("_", "-") for k in others)
        raise GptlabError(f"{flags} configure LoRA adapters: give --lora-rank R (and --init-from MODEL) too")


def _preset(name: str, label: str) -> dict[str, Any]:
    """A preset's values, with its name recorded; an unknown name is refused, never trained as defaults."""
    if name not in TRAIN_PRESETS:
        raise GptlabError(f"{label}: unknown preset {name!r}; known presets: {', '.join(TRAIN_PRESETS)}")
    return {**TRAIN_PRESETS[name], "preset": name}


def checked_train_config(values: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from option: value pairs (integers accepted for float options)."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise GptlabError(f"unknown training option(s): {', '.join(unknown)}")
    values = {k: float(v) if kinds[k] == "float" and type(v) is int else v for k, v in values.items()}
    config = TrainConfig(**values)
    config.validate()
    return config


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise GptlabError(f"config file {path} is a directory; --config takes a JSON file of option: value")
    if not path.is_file():
        raise GptlabError(f"config file not found: {path}")
    return read_options(path, f"config file {path}")


def read_options(path: Path, label: str, *, flags: bool = False) -> dict[str, Any]:
    """A JSON object of option: value (a --config file, a run's train_config.json), each known option's
    value of its field's type; anything else is one line led by `label`, naming the option as a field
    or (`flags`) as its command-line flag."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EnvironmentProblem(f"{label}: {describe_os_error(exc, path)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptlabError(f"{label} is not a readable JSON file: {exc}") from None
    if not isinstance(values, dict):
        raise GptlabError(f"{label} must hold a JSON object of option: value")
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for name, value in values.items():
        if name in kinds:
            check_type(f"{label}: {'--' + name.replace('_', '-') if flags else name}", value, kinds[name])
    return values
