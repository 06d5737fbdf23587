"""Set-up: from a config to a `Run` the loop can step, every check done before the disk is touched.

The order is the promise: the options, the processes, the run directory's suitability, the data, the
model (fresh, fine-tuned or resumed) and its memory, the dtype, the optimizer; only then is the run
directory claimed (and an old run replaced), the training state restored and train_config.json
written. The config is never changed: what set-up learns (the data path, the dtype `auto` chose, a
pretrained model's shape, the run directory) goes into a new config, which train_config.json records.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import load_model, resolve_model_dir
from ..config import GPTConfig
from ..data import TokenDataset, default_corpus_files, prepare
from ..data.layout import inspect as inspect_data_dir
from ..data.labeled import is_builtin
from ..errors import GptlabError
from ..fileio import atomic_write_json, remove_temporaries
from ..heads import MultipleChoice, SequenceClassifier, with_head
from ..lora import LoRAConfig, apply_lora, parse_targets
from ..model import GPT
from ..precision import warn_if_emulated
from ..tokenizers import GPT2Tokenizer, Tokenizer, TOKENIZER_FILE, load_tokenizer
from . import distributed
from .adder import AdderDataset
from .chat_data import ChatDataset
from .config import HEAD_TASKS, TRAIN_PRESETS, TrainConfig, checked_train_config, read_options
from .device import check_memory, compile_unavailable, enable_tf32, resolve_dtype
from .distributed import Group
from .labeled_data import LabeledDataset
from .metrics import truncate_metrics
from .optim import configure_optimizer, hidden_matrices, measure_muon_cost, muon_iteration_dtype
from .run_dir import BEST_DIR, METRICS_FILE, TRAIN_CONFIG_FILE, RunDirectory, check_run_dir, claim_run_dir
from .state import (
    STATE_FILE, TrainState, load_checkpoint, restore_process_rng_state, unusable_checkpoint,
)

DEFAULT_DATA_DIR = Path("data/shakespeare-char")
# What a resumed run may change from its saved options: how long, where and how fast it runs, how it
# is watched, and where its data now lives (a moved dataset, which must have the model's vocabulary).
# (A new max_iters also moves the end of the learning-rate decay unless --lr-decay-iters was set.)
RESUME_OPTIONS = ("max_iters", "max_time", "device", "compile", "on_nonfinite", "log_interval", "sample_tokens",
                  "eval_interval", "eval_iters", "data", "nproc", "activation_checkpointing",
                  "adapt_threads")

Dataset = TokenDataset | AdderDataset | ChatDataset | LabeledDataset


@dataclass
class Run:
    """A run set up and ready to train: the loop decides nothing about it, it only steps it."""

    config: TrainConfig  # resolved: the data path, the dtype, the model's shape, the run directory
    group: Group
    device: torch.device
    run_dir: Path
    dataset: Dataset
    tokenizer: Tokenizer
    state: TrainState
    step_model: torch.nn.Module  # the model as the steps call it: compiled and DDP-wrapped as asked
    micro_steps: int  # micro-batches per process and step
    resumed: bool
    directory: RunDirectory | None  # rank 0's claim (and lock) on run_dir

    def close(self) -> None:
        if self.directory is not None:
            self.directory.release()


def setup(config: TrainConfig, group: Group, device: torch.device, *, overwrite: bool, resume: bool,
          show_progress: bool) -> Run:
    """Check everything, then claim the run directory and make the run; see the module docstring."""
    check_processes(config, group)
    if group.is_main:
        check_run_dir(config.out, overwrite=overwrite, resume=resume)
    if resume:
        config = resumed_config(Path(config.out), config)
    if group.is_main:  # rank 0 may prepare the built-in corpus; the others open it once it is there
        config, dataset = open_dataset(config)
    distributed.barrier(group)
    if not group.is_main:
        config, dataset = open_dataset(config)
    checkpoint = load_checkpoint(Path(config.out)) if resume and group.is_main else None
    checkpoint = distributed.broadcast_from_main(checkpoint, group)
    enable_tf32(device)
    torch.manual_seed(config.seed)
    if checkpoint is not None:
        model = resumed_model(checkpoint, config, dataset.tokenizer.vocab_size, device, dataset)
    else:
        model = build_model(config, dataset.tokenizer.vocab_size, device, dataset)
    # the model's shape as trained (a pretrained one's), and the dtype `auto` chose: the probe runs
    # the model's products at one micro-batch
    config = dataclasses.replace(
        config, n_layer=model.config.n_layer, n_head=model.config.n_head, n_embd=model.config.n_embd,
        bias=model.config.bias, init_from=lora_base(config.init_from) if config.lora_rank else config.init_from,
        dtype=resolve_dtype(config.dtype, device, group, model.config, config.batch_size * config.block_size),
    )
    if config.dtype == "bfloat16" and group.is_main:  # asked for, not chosen: say so where it is emulated
        warn_if_emulated(config.dtype, device)
    config, muon_dtype = choose_muon(model, config, group, device, resumed=checkpoint is not None)
    optimizer = configure_optimizer(model, config, device, muon_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")
    state = TrainState(model, optimizer, scaler, np.random.default_rng(config.seed))

    directory = None
    if group.is_main:
        directory = claim_run_dir(config.out, config.preset or "run", overwrite=overwrite, resume=resume)
    run_dir = distributed.broadcast_from_main(directory and directory.path, group)
    try:
        config = dataclasses.replace(config, out=str(run_dir))
        if checkpoint is not None:
            restore(state, checkpoint, config.seed, group, run_dir, show_progress)
        elif group.rank > 0:
            torch.manual_seed(config.seed + group.rank)  # each process its own dropout draws
        if group.is_main:  # the marker first: a new run is recognisably a run from its first file on
            atomic_write_json(run_dir / TRAIN_CONFIG_FILE, config.to_dict())  # what this session trains with
            if checkpoint is None:
                dataset.tokenizer.save(run_dir)
        model.train()
        step_model = prepare_for_training(model, config, group, device)
    except BaseException:
        if directory is not None:
            directory.release()
        raise
    return Run(config, group, device, run_dir, dataset, dataset.tokenizer, state, step_model,
               config.grad_accum // group.world_size, checkpoint is not None, directory)


def choose_muon(
    model: GPT, config: TrainConfig, group: Group, device: torch.device, resumed: bool,
    measure: Callable[..., Any] | None = None,
) -> tuple[TrainConfig, torch.dtype | None]:
    """For a Muon run: the dtype of its iterations (`muon_iteration_dtype`), and whether Muon pays here
    (`measure_muon_cost`: its step against AdamW's and the forward and backward passes), measured by
    rank 0 for every process. Where it does not pay, a preset whose recipe is Muon falls back to AdamW
    (the recipe is "Muon where it pays": its learning rate and weight decay serve both, as Muon's update
    is scaled to AdamW's), which train_config.json records; a run that asked for Muon itself, or a
    resumed one (its optimizer state is Muon's), keeps it and is told what it costs."""
    if config.optimizer != "muon":
        return config, None
    decided = None
    if group.is_main:
        dtype = muon_iteration_dtype(hidden_matrices(model), device)
        cost = (measure or measure_muon_cost)(model, config, device, config.grad_accum // group.world_size, dtype)
        recipe = TRAIN_PRESETS.get(config.preset or "", {}).get("optimizer") == "muon"
        fall_back = not cost.pays and recipe and not resumed
        if not cost.pays:
            what = ("the preset's recipe takes AdamW where Muon does not pay: --optimizer adamw" if fall_back
                    else "--optimizer adamw may train further in the same time")
            print(f"Muon costs too much here: {cost.describe()}; {what}", file=sys.stderr)
        decided = ("adamw" if fall_back else "muon", str(dtype).removeprefix("torch."))
    optimizer, dtype_name = distributed.broadcast_from_main(decided, group)
    return dataclasses.replace(config, optimizer=optimizer), getattr(torch, dtype_name)


def check_processes(config: TrainConfig, group: Group) -> None:
    if config.nproc > 1 and not distributed.launched_by_torchrun():
        raise GptlabError(
            f"nproc={config.nproc}: start the processes with `gptlab train --nproc {config.nproc}` or torchrun; "
            f"train() runs in the calling process"
        )
    if distributed.launched_by_torchrun() and config.nproc not in (1, group.local_world_size):
        raise GptlabError(f"--nproc {config.nproc} contradicts torchrun's {group.local_world_size} processes per node")
    if config.grad_accum % group.world_size:
        raise GptlabError(
            f"--grad-accum {config.grad_accum} must be a multiple of the number of processes ({group.world_size}): "
            f"it counts the micro-batches of a whole step, shared equally among them"
        )


# --- options -------------------------------------------------------------------------------------


def saved_options(run_dir: Path) -> dict[str, Any]:
    """The options a run was last trained with (its train_config.json), for `--resume` to start from."""
    path = Path(run_dir) / TRAIN_CONFIG_FILE
    if not (Path(run_dir) / STATE_FILE).is_file():
        raise GptlabError(f"{run_dir}: no {STATE_FILE} to resume from")
    saved = read_options(path, str(path), flags=True)
    known = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in saved.items() if k in known}


def resumed_config(run_dir: Path, given: TrainConfig) -> TrainConfig:
    """`given`, except where it differs from the run's saved options in a way that would change what
    the resumed run computes: those differences are reported and the saved values kept.

    The command line builds `given` from the saved options and the options typed with --resume, so
    every option typed (even one equal to its default) counts; RESUME_OPTIONS may change.
    """
    values = saved_options(run_dir)
    if given.lora_rank and not values.get("lora_rank"):
        raise GptlabError(f"{run_dir}: trained every weight, without a LoRA adapter; --lora-rank starts a new run "
                          f"(--init-from {run_dir}), it cannot resume this one")
    ignored = []
    for name, value in given.to_dict().items():
        if name in values and value == values[name]:
            continue
        if name in RESUME_OPTIONS or name == "out" or name not in values:
            values[name] = value
        else:
            ignored.append(f"--{name.replace('_', '-')}")
    if ignored and distributed.is_main_process():
        print(f"--resume keeps the run's saved options; ignoring {', '.join(sorted(ignored))}", file=sys.stderr)
    values["out"] = str(run_dir)
    try:
        return checked_train_config(values)
    except GptlabError as exc:
        raise GptlabError(f"{Path(run_dir) / TRAIN_CONFIG_FILE}: {exc}") from None


# --- data ----------------------------------------------------------------------------------------


def open_dataset(config: TrainConfig) -> tuple[TrainConfig, Dataset]:
    """The data of `config.task`, every split long enough for one window, and the config with the
    data directory resolved (so that a resume from any directory finds it)."""
    if config.task == "adder":
        dataset: Dataset = AdderDataset()
    elif config.task == "chat":
        if bool(config.data) == bool(config.hf_dataset):
            raise GptlabError("--task chat needs one of --data FILE (JSON lines of conversations) or --hf-dataset NAME")
        dataset = ChatDataset(config.data, chat_tokenizer(config.init_from), config.block_size,
                              hf_dataset=config.hf_dataset, hf_config=config.hf_config, hf_split=config.hf_split)
        if config.data:
            config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
    elif config.task in HEAD_TASKS:
        dataset = LabeledDataset(config.data, config.task, chat_tokenizer(config.init_from), config.block_size)
        if not is_builtin(config.data):
            config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
    elif config.hf_dataset:
        raise GptlabError("--hf-dataset is for --task chat; for text, run gptlab prepare --hf-dataset NAME first")
    else:
        data_dir = Path(config.data) if config.data else default_data()
        dataset = TokenDataset(data_dir)
        config = dataclasses.replace(config, data=str(data_dir.resolve()))
    for split in ("train", "val"):
        dataset.check_length(split, config.block_size)
    return config, dataset


def chat_tokenizer(init_from: str) -> Tokenizer:
    """The tokenizer of the model being tuned (GPT-2's for a fresh model or one saved without one)."""
    if not init_from:
        return GPT2Tokenizer()
    directory = resolve_model_dir(init_from)
    if (directory / TOKENIZER_FILE).is_file() or (directory / "vocab.json").is_file():
        return load_tokenizer(directory)
    return GPT2Tokenizer()


def default_data() -> Path:
    """The built-in corpus, the complete works of Shakespeare, prepared once into DEFAULT_DATA_DIR (and
    again where an older gptlab or an interrupted prepare left it; prepare refuses anything else there)."""
    existing = inspect_data_dir(DEFAULT_DATA_DIR).kind
    if existing != "dataset":
        print(f"preparing the built-in corpus (complete works of Shakespeare) in {DEFAULT_DATA_DIR}")
        prepare([str(p) for p in default_corpus_files()], "char", DEFAULT_DATA_DIR, overwrite=existing != "none")
    return DEFAULT_DATA_DIR


# --- the model -----------------------------------------------------------------------------------


def build_model(config: TrainConfig, vocab_size: int, device: torch.device, dataset: Dataset | None = None) -> GPT:
    """A fresh GPT, or with --init-from a run, a Hugging Face GPT-2 directory or a GPT-2 size to fine-tune.

    A pretrained model keeps its own architecture (its n_layer, n_head, n_embd and bias), which set-up
    then records in the run's config. For --task classify or choice its body gets the task's head
    (a pretrained task model's own head is left behind: the labels are this run's).
    """
    tokens = config.batch_size * config.block_size
    if not config.init_from:
        check_memory(config.model_config(vocab_size), tokens, config.dtype, device)
        return GPT(config.model_config(vocab_size)).to(device)
    model = load_model(config.init_from, dropout=config.dropout)
    source = model.config
    # with LoRA only the (frozen) weights take memory: no gradient, no optimizer state
    check_memory(source, tokens, config.dtype, device, bytes_per_parameter=4 if config.lora_rank else 12)
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
    if config.task in HEAD_TASKS:
        model = task_model(model, config, dataset)
    if config.lora_rank:
        apply_lora(model, lora_settings(config))
    return model.to(device)


def task_model(body: GPT, config: TrainConfig, dataset: Dataset | None) -> GPT:
    """`body` with a new head for the run's task: the data's labels, and the pad id its batches use."""
    if not isinstance(dataset, LabeledDataset):
        raise ValueError(f"--task {config.task} builds its head from a LabeledDataset")
    if config.task == "classify":
        return with_head(body, SequenceClassifier, labels=dataset.labels, pad_token_id=dataset.pad_token_id,
                         lm_loss_weight=config.lm_loss_weight)
    return with_head(body, MultipleChoice, lm_loss_weight=config.lm_loss_weight)


def lora_settings(config: TrainConfig) -> LoRAConfig:
    """The run's adapter; its base is --init-from, as a directory's absolute path or a GPT-2 size's name."""
    heads = {"classify": (("score",), "SEQ_CLS"), "choice": (("multiple_choice_head",), None)}
    # a task head trains whole beside the adapters (peft's modules_to_save); SEQ_CLS: peft's classifier wrapper
    modules_to_save, task_type = heads.get(config.task, ((), "CAUSAL_LM"))
    return LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                      targets=parse_targets(config.lora_targets), base=lora_base(config.init_from),
                      modules_to_save=modules_to_save, task_type=task_type)


def lora_base(init_from: str) -> str:
    """--init-from as an adapter names its base: wherever the adapter (or a resumed run) is read from."""
    return str(Path(init_from).resolve()) if Path(init_from).is_dir() else init_from


def resumed_model(checkpoint: dict[str, Any], config: TrainConfig, vocab_size: int, device: torch.device,
                  dataset: Dataset | None = None) -> GPT:
    """The checkpoint's model, rebuilt from its own shape and loaded with its weights."""
    run_dir = Path(config.out)
    with unusable_checkpoint(run_dir):
        shape = GPTConfig(**checkpoint["model_config"])
    if shape.vocab_size != vocab_size:
        raise GptlabError(
            f"--data {config.data}: its tokenizer has {vocab_size} tokens, the run's model {shape.vocab_size}; "
            f"resume with the data the run was trained on"
        )
    if config.lora_rank:  # the frozen base again, from --init-from; its adapter comes with the state
        model = build_model(config, vocab_size, device, dataset)
        if model.config.to_dict() != shape.to_dict():
            raise GptlabError(f"--init-from {config.init_from} is no longer the base this LoRA run trained "
                              f"(its shape differs from the checkpoint's); restore that model to resume")
        return model
    check_memory(shape, config.batch_size * config.block_size, config.dtype, device)
    with unusable_checkpoint(run_dir):
        model = GPT(shape)
        if config.task in HEAD_TASKS:  # the head's shape comes from the data's labels, as when the run began
            model = task_model(model, config, dataset)
        model.load_state_dict(checkpoint["model"])
    return model.to(device)


def restore(
    state: TrainState, checkpoint: dict[str, Any], seed: int, group: Group, run_dir: Path, show: bool
) -> None:
    """Continue where the checkpoint stopped: the state, this process's random states, the run's files."""
    with unusable_checkpoint(run_dir):
        state.restore(checkpoint)
        saved = checkpoint["process_rng"]
        if group.rank < len(saved):
            restore_process_rng_state(saved[group.rank])
        else:
            torch.manual_seed(seed + group.rank + state.step)  # a process the run did not have
    if not group.is_main:
        return
    if len(saved) != group.world_size:
        print(f"resuming with {group.world_size} processes where the run had {len(saved)}: the batches are the "
              f"same, dropout draws are not", file=sys.stderr)
    for directory in (run_dir, run_dir / BEST_DIR):
        if directory.is_dir():
            remove_temporaries(directory)
    truncate_metrics(run_dir / METRICS_FILE, state.step)
    if show:
        print(f"resuming {run_dir} at step {state.step}")


def checkpoint_activations(model: GPT) -> None:
    """Keep only each block's input for the backward pass and recompute the block there
    (torch.utils.checkpoint, non-reentrant): activation memory falls from every intermediate of every
    block to one (B, T, C) tensor per block, for about a third more compute. The blocks stay the
    modules they are, so parameter names, the optimizer's groups and the checkpoint keys do not change;
    without gradients (evaluation) or with a KV cache (generation) a block runs as usual."""
    for block in model.transformer.h:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable[..., torch.Tensor], x: torch.Tensor, cache: Any = None) -> torch.Tensor:
    if cache is not None or not torch.is_grad_enabled():
        return forward(x, cache)
    return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)


def prepare_for_training(model: GPT, config: TrainConfig, group: Group, device: torch.device) -> torch.nn.Module:
    """The module the steps call: with activation checkpointing and compiled if asked (and possible),
    wrapped in DDP under torchrun."""
    if config.activation_checkpointing:
        checkpoint_activations(model)
    step_model: torch.nn.Module = model
    if config.compile:
        reason = compile_unavailable(device)
        if reason:
            if group.is_main:
                print(f"--compile: {reason}; training without it", file=sys.stderr)
        else:
            step_model = torch.compile(model)
    if group.active:
        device_ids = [device.index] if device.type == "cuda" else None
        step_model = DistributedDataParallel(step_model, device_ids=device_ids, gradient_as_bucket_view=True)
    return step_model
