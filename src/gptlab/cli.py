"""The `gptlab` command line: parse the arguments, call the library, turn user errors into one line."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from .data.pipeline import DEFAULT_SHARD_TOKENS
from .train.config import FIELD_CHOICES, HEAD_TASKS, TRAIN_PRESETS, TrainConfig
from .errors import GptlabError
from .fileio import describe_os_error
from .inference.params import SamplingParams
from .serve.limits import ServerLimits, option_name

Handler = Callable[[argparse.Namespace], int]


def _add_corpus(p: argparse.ArgumentParser) -> None:
    """The inputs a corpus is read from, the same for prepare and tokenizer train."""
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories or glob patterns")
    p.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset: a save_to_disk directory, a "
                   "directory of data files or a Hub name (needs pip install 'gptlab[datasets]')")
    p.add_argument("--hf-config", metavar="C", help="the dataset's configuration (subset)")
    p.add_argument("--split", default="train", help="the Hugging Face dataset's split to read")
    p.add_argument("--text-field", default="text", help="the field or column holding the text in records")
    p.add_argument("--skip-binary", action="store_true",
                   help="skip plain-text inputs that are not UTF-8 text (NUL bytes, invalid bytes) and count them")


def _require_corpus(args: argparse.Namespace) -> None:
    if not args.inputs and not args.hf_dataset:
        raise GptlabError("give input files, directories or patterns, or --hf-dataset NAME")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a corpus into token shards for training",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Tokenize a corpus, streamed through every core, into a data directory: token shards per "
                    "split, meta.json and the tokenizer. A file's format comes from its suffix: .jsonl/.json, "
                    ".csv, .tsv, .parquet (one document per record) or anything else as plain text (one document "
                    "per file); .gz, .zst, .xz and .bz2 are decompressed. Validation is a set of whole documents, "
                    "or the last fraction of tokens of a single-document corpus.",
    )
    _add_corpus(p)
    p.add_argument("--tokenizer", default="char", metavar="{char,gpt2,DIR}",
                   help="character-level, GPT-2 BPE, or a tokenizer directory (gptlab tokenizer train)")
    p.add_argument("--out", required=True, help="the data directory to write (new, empty, or a dataset to "
                   "replace with --overwrite)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the share of tokens kept for validation, above 0 and below 1 (training is measured there)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: every core)")
    p.add_argument("--overwrite", action="store_true", help="replace the gptlab dataset in --out (only that)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    _require_corpus(args)
    if not 0 < args.val_fraction < 1:  # also NaN
        raise GptlabError(f"--val-fraction must be above 0 and below 1, got {args.val_fraction}: training "
                          "measures its validation loss (and the report its perplexity) on that share; 0.1 is usual")
    _check_range("--shard-tokens", args.shard_tokens, 1)
    if args.workers is not None:
        _check_range("--workers", args.workers, 1)
    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, overwrite=args.overwrite,
                   text_field=args.text_field, hf_dataset=args.hf_dataset, hf_config=args.hf_config,
                   hf_split=args.split, skip_binary=args.skip_binary, shard_tokens=args.shard_tokens,
                   workers=args.workers, show_progress=False if args.no_progress else None)
    documents = meta["documents"]
    val = ("the last part of its one document" if meta["val_split"] == "tail"
           else f"{documents['val']:,} of {sum(documents.values()):,} documents")
    print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
          f"(validation: {val}; {meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']:,})")
    if meta["skipped"]:
        print(f"skipped {len(meta['skipped']):,} files that are not text, e.g. {meta['skipped'][0]}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a GPT (with no arguments: the built-in Shakespeare demo)",
        description="Train a GPT. Options are applied in order: defaults, --preset, --config, then the "
                    "individual options. With no arguments at all, trains the built-in default: a "
                    "character-level model of the complete works of Shakespeare, 4 minutes of training on a CPU.",
    )
    p.add_argument("--config", metavar="FILE", help="a JSON file of option: value pairs")
    p.add_argument("--overwrite", action="store_true", help="replace the gptlab run in --out (a run only, once every check of the new run has passed)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(TrainConfig):  # every option's help line is the field's, in config.py
        flag = "--" + f.name.replace("_", "-")
        choices = sorted(TRAIN_PRESETS) if f.name == "preset" else FIELD_CHOICES.get(f.name)
        default = "shakespeare-char-default when no --data, --config or --resume is given" if f.name == "preset" \
            else repr(f.default)
        help_text = f.metadata["help"] + (f"; one of {', '.join(choices)}" if choices else "") + f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help lines with %
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=kind, default=None, dest=f.name, metavar=f.name.upper(), help=help_text,
                           choices=choices if f.name == "preset" else None)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train.config import build_train_config
    from .train.distributed import is_main_process, launch, launched_by_torchrun
    from .train.report import headline
    from .train import saved_options, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}  # None: not given
    preset = overrides.pop("preset")
    if preset is None and not overrides["data"] and not args.config and not args.resume:
        preset = "shakespeare-char-default"
    if args.resume and not overrides["out"]:
        raise GptlabError("--resume needs --out RUN_DIR, the run to continue")
    if args.resume and args.overwrite:
        raise GptlabError("--resume and --overwrite contradict each other; choose one")
    # resuming starts from the run's own options: every option typed changes one, even to its default
    base = saved_options(Path(overrides["out"])) if args.resume else None
    config = build_train_config(preset, args.config, overrides, base=base)
    if config.nproc > 1 and not launched_by_torchrun():
        return launch(config.nproc, _train_argv(args))  # the same command in nproc processes, DDP
    result = train(config, overwrite=args.overwrite, resume=args.resume, show_progress=not args.no_progress)
    if not is_main_process():
        return 0
    if result.stopped_by:
        print(f"gptlab train: {result.stopped_by} at step {result.step}: checkpoint written; continue with "
              f"gptlab train --resume --out {result.run_dir}", file=sys.stderr)
        return 128 + signal.Signals[result.stopped_by].value
    print(f"run {result.run_dir}: {result.step:,} steps in {result.seconds:,.0f} s of training (what --max-time "
          f"counts: steps, evaluations, checkpoints), then {result.finish_seconds:,.0f} s for the final evaluation "
          f"and report; train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}")
    if result.warning:
        print(f"gptlab train: warning: {result.warning}", file=sys.stderr)
    summary = headline(result.run_dir)
    if summary:
        print(summary)
    if config.sample_tokens > 0 and config.task not in HEAD_TASKS:
        print("--- sample ---")
        params = SamplingParams(**SAMPLE_DEFAULTS | dict(max_new_tokens=config.sample_tokens, seed=config.seed))
        _print_stream(result.run_dir, "", params, config.device)
    print(_next_commands(result.run_dir, result.config))
    return 0


def _next_commands(run_dir: Path, config: TrainConfig) -> str:
    """What to try with a trained run, as commands to copy (spelled as this command was run)."""
    import shlex

    program = shlex.quote(sys.argv[0]) if Path(sys.argv[0]).name == "gptlab" else "gptlab"
    run = shlex.quote(str(run_dir))
    if config.task in HEAD_TASKS:
        lines = ["next:", f"  {program} eval {run} --data {shlex.quote(config.data)}    # accuracy and a confusion table"]
        if config.task == "classify":
            lines.append(f"  {program} classify {run} --text \"...\"    # a label and its probability")
        return "\n".join(lines)
    lines = ["next:",
             f"  {program} sample {run} --max-new-tokens 500    # more text",
             f"  {program} serve {run}    # an OpenAI-compatible API, and a playground at http://127.0.0.1:8000/"]
    if config.task == "text":
        lines.append(f"  {program} eval {run} --data {shlex.quote(config.data)} --baselines    "
                     f"# the whole validation split, against n-gram baselines")
    return "\n".join(lines)


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The `gptlab train` arguments that reproduce `args`, for the processes torchrun starts."""
    argv = ["train"]
    if args.config:
        argv += ["--config", args.config]
    argv += [f"--{flag.replace('_', '-')}" for flag in ("overwrite", "resume", "no_progress") if getattr(args, flag)]
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        flag = f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            argv += [f"--{flag}", str(value)]
    return argv


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a run or a Hugging Face GPT-2 directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a run directory or a Hugging Face GPT-2 directory")
    p.add_argument("--prompt", default="", help="the text to continue (empty: start of a document)")
    _add_fields(p, SamplingParams, SAMPLE_DEFAULTS)
    p.add_argument("--num-samples", type=int, default=1, help="how many samples to draw")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    _add_precision(p)
    p.set_defaults(handler=_run_sample)


# The SamplingParams fields `sample` offers, with its defaults (longer and cooler than a request's).
SAMPLE_DEFAULTS: dict[str, Any] = dict(max_new_tokens=200, temperature=0.8, top_k=None, top_p=None,
                                       repetition_penalty=1.0, seed=None, stop=())
_OPTION_TYPES = {"int": int, "float": float, "str": str}


def _add_fields(p: argparse.ArgumentParser, cls: type, defaults: dict[str, Any]) -> None:
    """One option per field of the dataclass `cls` named in `defaults`, with that default; its name, help and
    metavar from the field's metadata (as train's come from TrainConfig's). A tuple field repeats."""
    for f in fields(cls):
        if f.name not in defaults:
            continue
        flag = option_name(f)
        common = dict(dest=f.name, help=f.metadata["help"].replace("%", "%%"), metavar=f.metadata.get("metavar"))
        if f.type.startswith("tuple["):
            p.add_argument(flag, action="append", default=list(defaults[f.name]), **common)
        else:
            p.add_argument(flag, type=_OPTION_TYPES[f.type.removesuffix(" | None")], default=defaults[f.name],
                           **common)


def _add_precision(p: argparse.ArgumentParser) -> None:
    """--dtype and --quantize: how `sample` and `serve` hold the model (inference.loading reads both)."""
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and KV cache precision; bfloat16 halves memory, its speed depends on the CPU "
                        "(a warning says where it is emulated, slower than float32)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: weights in int8 with a scale per output channel, activations in float "
                        "(a quarter of float32's memory; faster decoding where torch's int8 kernel is); "
                        "the model's files are not changed")


def _run_sample(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise GptlabError("--num-samples must be at least 1")
    params = SamplingParams(**{name: getattr(args, name) for name in SAMPLE_DEFAULTS} | {"stop": tuple(args.stop)})
    _print_stream(Path(args.model), args.prompt, params, args.device, dtype=args.dtype,
                  num_samples=args.num_samples, quantize=args.quantize)
    return 0


def _print_stream(model_dir: Path, prompt: str, params: SamplingParams, device: str, *, dtype: str = "float32",
                  num_samples: int = 1, quantize: str | None = None) -> None:
    """Write the prompt, then each sample's text as it is generated; sample i uses seed + i."""
    from .inference import TextStream
    from .inference.loading import load_pretrained
    from .tokenizers import document_start_ids
    from .device import resolve_device

    try:
        params.validate()
    except ValueError as exc:
        raise GptlabError(str(exc)) from None
    model, tokenizer = load_pretrained(model_dir, resolve_device(device), dtype=dtype, quantize=quantize)
    ids = tokenizer.encode(prompt) if prompt else document_start_ids(tokenizer)
    seed = params.seed
    for i in range(num_samples):
        if i:
            sys.stdout.write("\n---\n")
            params.seed = None if seed is None else seed + i
        sys.stdout.write(prompt)
        for piece in TextStream(model, tokenizer, ids, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="a conversation in the terminal with a chat-tuned run (train --task chat)",
                       description="Each line read from stdin is your next message; the reply follows it. "
                                   "Ctrl-D (end of input) ends the conversation.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a run tuned with gptlab train --task chat (or its export)")
    p.add_argument("--system", default="", help="a system message that opens the conversation")
    _add_fields(p, SamplingParams, SAMPLE_DEFAULTS)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    _add_precision(p)
    p.set_defaults(handler=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .inference import converse
    from .inference.loading import load_pretrained

    params = SamplingParams(**{name: getattr(args, name) for name in SAMPLE_DEFAULTS} | {"stop": tuple(args.stop)})
    try:
        params.validate()
    except ValueError as exc:
        raise GptlabError(str(exc)) from None
    model, tokenizer = load_pretrained(Path(args.model), resolve_device(args.device), dtype=args.dtype,
                                       quantize=args.quantize)
    interactive = sys.stdin.isatty()

    def lines():
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    converse(model, tokenizer, lines(), params, system=args.system, write=write,
             note=lambda text: print(f"gptlab chat: {text}", file=sys.stderr))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a playground at /",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a run or a Hugging Face GPT-2 directory: POST /v1/completions (streaming, logprobs, "
                    "echo), GET /v1/models, GET /health, GET /metrics (Prometheus), POST /tokenize and "
                    "/detokenize, API docs at /docs, a playground at /. One engine advances every request "
                    "together (continuous batching).",
    )
    p.add_argument("model", metavar="MODEL", help="a run directory or a Hugging Face GPT-2 directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback lets other machines use the model (no auth)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535")
    p.add_argument("--model-name", default=None, help="the model id clients send; None: the MODEL directory's name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    _add_fields(p, ServerLimits, {f.name: f.default for f in fields(ServerLimits)})
    _add_precision(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .serve import is_loopback, serve
    from .device import resolve_device

    if not 1 <= args.port <= 65535:
        raise GptlabError(f"--port must be in 1-65535, got {args.port}")
    limits = ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits)})  # checks them
    if not is_loopback(args.host):
        print(f"gptlab serve: warning: binding to {args.host}: anyone who can reach this address can use "
              f"the model, without authentication", file=sys.stderr)
    serve(args.model, host=args.host, port=args.port, device=resolve_device(args.device),
          model_id=args.model_name, limits=limits, dtype=args.dtype, quantize=args.quantize)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a model as a Hugging Face GPT-2 directory or a GGUF file (llama.cpp, Ollama)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="--format hf: copy a model into the directory OUT as config.json + model.safetensors plus "
                    "its tokenizer's files and nothing else (no optimizer state, no metrics), for transformers or "
                    "the Hub; refuses a model Hugging Face GPT-2 cannot represent (e.g. one trained with "
                    "--no-bias). --format gguf: write OUT as one GGUF file with the tokenizer inside, for "
                    "llama.cpp, Ollama or LM Studio; refuses a vocabulary llama.cpp cannot represent "
                    "(a character vocabulary).",
    )
    p.add_argument("model", metavar="MODEL", help="a run directory, a Hugging Face GPT-2 directory or a GPT-2 size")
    p.add_argument("out", metavar="OUT", help="the directory (--format hf) or file (--format gguf) to write")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="what to write")
    p.add_argument("--quantize", choices=("f32", "f16", "q8_0"), default=None,
                   help="GGUF only: how the weight matrices are stored (f32 exact; f16; q8_0, 8 bits per value "
                        "plus a scale per 32) [default: f32]")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    p.add_argument("--merge", action="store_true", help="MODEL is a LoRA adapter (a LoRA run): write its base with "
                   "the adapter merged in, a plain GPT-2 (without --merge: the adapter alone, as peft saves it)")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from .gguf_export import export_gguf

        if args.merge:
            raise GptlabError("--merge applies to --format hf; export the merged model first, then that "
                              "directory with --format gguf")

        path = export_gguf(args.model, args.out, quantize=args.quantize or "f32", overwrite=args.overwrite)
        print(f"wrote {path} (GGUF, {args.quantize or 'f32'}, {path.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.quantize is not None:
        raise GptlabError("--quantize applies to --format gguf only; a Hugging Face export keeps the weights as "
                          "they are")
    from .checkpoint import export_model

    files = export_model(args.model, args.out, overwrite=args.overwrite, merge=args.merge)
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on a whole split or text, or lm-evaluation-harness tasks (--tasks)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="With --data or --text: score every token of a data split (or a text file) once, reading "
                    "texts longer than the context through a sliding window; with --baselines, Kneser-Ney "
                    "n-grams fitted on the data's train split are scored on the same tokens. With --tasks: run "
                    "lm-evaluation-harness tasks (e.g. hellaswag,lambada_openai,wikitext) on the model through "
                    "lm-eval's API, print lm-eval's table and write its results to RUN/lm_eval/ (needs the "
                    "eval extra: pip install 'gptlab[eval]').",
    )
    p.add_argument("model", metavar="MODEL", help="a run directory or a Hugging Face GPT-2 directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DATA_DIR", help="a prepared data directory (gptlab prepare); for a "
                        "classify or choice run: labelled examples (a file, scored whole; a directory's --split; "
                        "or a built-in task's name), scored for accuracy")
    source.add_argument("--text", metavar="FILE", help="a UTF-8 text file, tokenized with the model's tokenizer")
    source.add_argument("--tasks", metavar="TASK,...", help="lm-eval task names, comma-separated")
    p.add_argument("--split", choices=["val", "train"], default="val", help="the split of --data to score")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window; every token then sees at least context-stride+1 "
                        "tokens of context (None: half the context)")
    p.add_argument("--context", type=int, default=None, help="window length (None: the model's context)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass, or lm-eval requests per batch (None: automatic, 16 for tasks)")
    p.add_argument("--baselines", action="store_true", help="also score unigram, bigram and the best n-gram")
    p.add_argument("--max-order", type=int, default=6, help="the highest n-gram order tried by --baselines")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: examples in each prompt (None: the task's)")
    p.add_argument("--limit", type=float, default=None,
                   help="--tasks: at most this many documents per task (below 1: a fraction of them)")
    p.add_argument("--include-path", metavar="DIR", default=None, help="--tasks: a directory of extra task YAML files")
    p.add_argument("--output", metavar="FILE.json", default=None,
                   help="--tasks: where to write lm-eval's results (None: MODEL/lm_eval/TIME-TASKS.json)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate import evaluate_model, markdown_table
    from .device import resolve_device

    from .evaluate.ngram import MAX_ORDER

    for name in ("stride", "context", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise GptlabError(f"--{name.replace('_', '-')} must be at least 1")
    _check_range("--max-order", args.max_order, 1, MAX_ORDER)
    if args.num_fewshot is not None:
        _check_range("--num-fewshot", args.num_fewshot, 0)
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise GptlabError(f"--limit must be a positive number (below 1: a fraction of each task), got {args.limit}")
    if args.tasks is not None:
        return _run_eval_tasks(args, resolve_device(args.device))
    if _task_run(args.model):
        return _run_eval_task_head(args, resolve_device(args.device))
    if args.data is None and args.text is None:
        raise GptlabError("give one of --data DATA_DIR, --text FILE or --tasks TASK,...")
    result = evaluate_model(
        args.model, data=args.data, split=args.split, text=args.text, stride=args.stride, context=args.context,
        batch_size=args.batch_size, device=resolve_device(args.device),
        baseline_order=args.max_order if args.baselines else 0,
    )
    if args.json:
        print(json.dumps({"model_path": str(args.model), **result.to_dict()}, indent=2))
        return 0
    print(f"{args.model} on {result.source}: {result.model.tokens:,} tokens scored, "
          f"context {result.context}, stride {result.stride}\n")
    print(markdown_table(result.rows(str(args.model))))
    return 0


def _task_run(model: str) -> bool:
    from .inference.classify import task_kind

    return task_kind(model) is not None


def _run_eval_task_head(args: argparse.Namespace, device) -> int:
    """A classify or choice run: accuracy on labelled --data (and a confusion table for a classifier)."""
    import json

    from .inference.classify import evaluate_task

    for flag in ("text", "baselines", "stride", "context", "batch_size"):
        if getattr(args, flag) not in (None, False):
            raise GptlabError(f"--{flag.replace('_', '-')} scores a language model; {args.model} is a task run, "
                              f"scored on labelled --data")
    if args.data is None:
        raise GptlabError(f"{args.model} is a task run: give --data, labelled examples (a file, a directory with "
                          f"train and val files, or a built-in task's name)")
    result = evaluate_task(args.model, args.data, args.split, device)
    if args.json:
        print(json.dumps({"model_path": str(args.model), **result.to_dict()}, indent=2))
        return 0
    print(f"{args.model} on {result.source}: accuracy {result.accuracy:.2%} ({result.correct:,} of "
          f"{result.count:,} examples)")
    if result.kind == "classify":
        print("\n" + result.table())
    return 0


def _run_eval_tasks(args: argparse.Namespace, device) -> int:
    import json

    from .evaluate.tasks import parse_tasks, results_path, run_tasks

    for flag in ("baselines", "stride", "context"):
        if getattr(args, flag) not in (None, False):
            raise GptlabError(f"--{flag} scores a whole split (--data/--text), not lm-eval tasks")
    tasks = parse_tasks(args.tasks)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_tasks(tasks, model_path=args.model, num_fewshot=args.num_fewshot, limit=limit,
                        batch_size=args.batch_size, device=device, include_path=args.include_path)
    path = results.write(Path(args.output) if args.output else results_path(args.model, tasks))
    if args.json:
        print(json.dumps({"model_path": str(args.model), "results_file": str(path), "results": results.raw["results"]},
                         indent=2, default=str))
        return 0
    print(results.table())
    print(f"results: {path}")
    return 0


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify", help="label texts with a classifier run (train --task classify)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Print each text's most probable label and every label's probability. MODEL is a run of "
                    "train --task classify (a LoRA run's adapter too), or a Hugging Face "
                    "GPT2ForSequenceClassification directory. A text longer than the context keeps its end.",
    )
    p.add_argument("model", metavar="MODEL", help="a classifier run or its export")
    p.add_argument("--text", action="append", required=True, help="a text to label; repeat for several")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help="print the labels and probabilities as JSON")
    p.set_defaults(handler=_run_classify)


def _run_classify(args: argparse.Namespace) -> int:
    import json

    from .device import resolve_device
    from .inference.classify import load_classifier

    classifier = load_classifier(args.model, resolve_device(args.device))
    rows = classifier.label(args.text)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        ranked = sorted(row["probabilities"].items(), key=lambda kv: -kv[1])
        print(f"{row['label']}\t" + ", ".join(f"{name} {p:.3f}" for name, p in ranked) + f"\t{row['text'][:60]!r}")
    return 0


def _add_ngram(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ngram", help="fit an interpolated Kneser-Ney n-gram model, score it and sample from it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fit on the train split of DATA_DIR, score on --split exactly as gptlab eval scores a model "
                    "(every token after the first, its bits per character from the same decoded text).",
    )
    p.add_argument("--data", metavar="DATA_DIR", required=True, help="a prepared data directory (gptlab prepare)")
    p.add_argument("--order", type=int, default=5, help="n: the model reads the n-1 previous tokens")
    p.add_argument("--split", choices=["val", "train"], default="val", help="the split to score")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens to sample (0: none)")
    p.add_argument("--prompt", default="", help="text the sample continues")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sample")
    p.add_argument("--json", action="store_true", help="print the score as JSON (and no sample)")
    p.set_defaults(handler=_run_ngram)


def _run_ngram(args: argparse.Namespace) -> int:
    import json
    import time

    import numpy as np

    from .data import TokenDataset
    from .evaluate import markdown_table, score_ngram
    from .evaluate.ngram import KneserNey, NGramCounts

    from .evaluate.ngram import MAX_ORDER

    _check_range("--order", args.order, 1, MAX_ORDER)
    _check_range("--sample-tokens", args.sample_tokens, 0)
    _check_seed(args.seed)
    dataset = TokenDataset(args.data)
    try:  # a character the vocabulary lacks is refused before the fitting, not after
        prompt = dataset.tokenizer.encode(args.prompt) if args.prompt else []
    except GptlabError as exc:
        raise GptlabError(f"--prompt: {exc}") from None
    start = time.perf_counter()
    lm = KneserNey(NGramCounts(dataset.split("train"), dataset.tokenizer.vocab_size, args.order), args.order)
    fitted = time.perf_counter() - start
    result = score_ngram(lm, dataset.tokenizer, dataset.split(args.split))
    if args.json:
        print(json.dumps({"data": args.data, "split": args.split, "order": args.order, **result.to_dict()}, indent=2))
        return 0
    print(f"{args.order}-gram (interpolated Kneser-Ney) fitted on {len(dataset.split('train')):,} train tokens "
          f"in {fitted:.2f}s, scored on the {args.split} split\n")
    print(markdown_table([(f"{args.order}-gram", result)]))
    if args.sample_tokens:
        tokens = lm.sample(prompt, args.sample_tokens, np.random.default_rng(args.seed))
        print(f"\n--- sample ---\n{args.prompt}{dataset.tokenizer.decode(tokens)}")
    return 0


def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention", help="draw a heatmap of the attention weights over a prompt",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Rows are the positions that attend (queries), columns the positions attended to (keys); "
                    "each row sums to 1 and nothing lies above the diagonal (causal).",
    )
    p.add_argument("model", metavar="MODEL", help="a run directory or a Hugging Face GPT-2 directory")
    p.add_argument("--prompt", required=True, help="the text whose attention is drawn")
    p.add_argument("--layer", type=int, default=0, help="the layer (0 is the first)")
    p.add_argument("--head", type=int, default=None, help="one head; None: a grid of all heads of the layer")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the image to write (format from the suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(handler=_run_attention)


def _run_attention(args: argparse.Namespace) -> int:
    from .attention_maps import attention_map, plot_attention
    from .inference.loading import load_pretrained
    from .device import resolve_device

    model, tokenizer = load_pretrained(args.model, resolve_device(args.device))
    amap = attention_map(model, tokenizer, args.prompt, layer=args.layer, head=args.head)
    out = plot_attention(amap, args.out, overwrite=args.overwrite)
    heads = f"head {args.head}" if args.head is not None else f"all {len(amap.heads)} heads"
    print(f"wrote {out}: layer {args.layer}, {heads}, {len(amap.labels)} tokens")
    return 0


def _check_range(flag: str, value: int, low: int, high: int | None = None) -> None:
    """An integer option within [low, high], before any work; one line naming the option otherwise."""
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise GptlabError(f"{flag} must be {span}, got {value}")


def _check_seed(seed: int | None) -> None:
    """What numpy's and torch's generators accept: a non-negative integer below 2**63."""
    if seed is not None and not 0 <= seed < 2**63:
        raise GptlabError(f"--seed must be a non-negative integer below 2**63, got {seed}")


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on your own corpus",
                       description="Tokenizers of your own; see docs/tokenizer.md.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser(
        "train", help="learn a byte-level BPE vocabulary from a corpus",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Learn a byte-level BPE (GPT-2's kind: 256 byte tokens, then merges, then special tokens) "
                    "from the inputs prepare reads, streamed. Writes GPT-2's vocab.json + merges.txt, a Hugging "
                    "Face tokenizer.json and gptlab's marker into --out; use it with gptlab prepare --tokenizer OUT.",
    )
    _add_corpus(t)
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in all: 256 bytes, merges, special tokens")
    t.add_argument("--out", required=True, help="the directory to write (new, empty, or a tokenizer with --overwrite)")
    t.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt2",
                   help="the pre-tokenizer's split: GPT-2's or GPT-4's (digits in threes, newlines apart)")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="a special token besides <|endoftext|> (always there); repeat for several")
    t.add_argument("--overwrite", action="store_true", help="replace the tokenizer in --out (only that)")
    t.set_defaults(handler=_run_tokenizer_train)


def _run_tokenizer_train(args: argparse.Namespace) -> int:
    import time

    from .data.tokenizer_training import train_tokenizer

    _require_corpus(args)
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.inputs, args.vocab_size, args.out, pattern=args.pattern,
                                special_tokens=args.special, text_field=args.text_field, hf_dataset=args.hf_dataset,
                                hf_config=args.hf_config, hf_split=args.split, skip_binary=args.skip_binary,
                                overwrite=args.overwrite)
    print(f"wrote {args.out}: {tokenizer.vocab_size:,} tokens ({len(tokenizer.merges):,} merges, "
          f"{len(tokenizer.special_tokens)} special) in {time.perf_counter() - start:.1f} s; "
          f"next: gptlab prepare INPUT... --tokenizer {args.out} --out DATA_DIR")
    if tokenizer.vocab_size < args.vocab_size:
        print(f"gptlab tokenizer: note: the corpus had no more pairs to merge, so {tokenizer.vocab_size:,} tokens "
              f"rather than {args.vocab_size:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="A from-scratch GPT-2: prepare a corpus, train, sample, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_prepare, _add_train, _add_sample, _add_chat, _add_serve, _add_export, _add_eval, _add_classify,
                _add_ngram, _add_attention, _add_tokenizer):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake exits 2, a refusal of the machine (disk, permission) 3."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # plain `gptlab`: what it can do, rather than an error
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except GptlabError as exc:
        print(f"gptlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the environment said no where no library code expected it: still one line
        print(f"gptlab {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
