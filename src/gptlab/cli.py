"""The `gptlab` command line: parse the arguments, call the library, turn user errors into one line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Callable

from .config import TRAIN_PRESETS, TrainConfig
from .errors import GptlabError

Handler = Callable[[argparse.Namespace], int]


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a text corpus into train.bin / val.bin",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, directories or glob patterns")
    p.add_argument("--tokenizer", choices=["char", "gpt2"], default="char", help="character-level or GPT-2 BPE")
    p.add_argument("--out", required=True, help="the data directory to write")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of tokens kept for validation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data directory")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, overwrite=args.overwrite)
    print(f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
          f"({meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']:,})")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a GPT (with no arguments: the built-in Shakespeare demo)",
        description="Train a GPT. Options are applied in order: defaults, --preset, --config, then the "
                    "individual options. With no arguments at all, trains the built-in default: a "
                    "character-level model of the complete works of Shakespeare, within 5 minutes on a CPU.",
    )
    p.add_argument("--config", metavar="FILE", help="a JSON file of option: value pairs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        help_text = f"default: {default!r}"
        if f.name == "preset":
            p.add_argument(flag, choices=sorted(TRAIN_PRESETS), default=None,
                           help="named settings (default: shakespeare-char-default when no --data is given)")
        elif f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(default))
            p.add_argument(flag, type=kind, default=None, dest=f.name, metavar=f.name.upper(), help=help_text)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .config import build_train_config
    from .train import train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    preset = overrides.pop("preset")
    if preset is None and not overrides["data"] and not args.config and not args.resume:
        preset = "shakespeare-char-default"
    if args.resume and not overrides["out"]:
        raise GptlabError("--resume needs --out RUN_DIR, the run to continue")
    if args.resume and args.overwrite:
        raise GptlabError("--resume and --overwrite contradict each other; choose one")
    config = build_train_config(preset, args.config, overrides)
    result = train(config, overwrite=args.overwrite, resume=args.resume, show_progress=not args.no_progress)
    print(f"run {result.run_dir}: {result.step} steps in {result.seconds:.0f}s, "
          f"train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}")
    if config.sample_tokens > 0:
        print("--- sample ---")
        _print_stream(result.run_dir, prompt="", max_new_tokens=config.sample_tokens, temperature=0.8,
                      top_k=None, top_p=None, seed=config.seed, device=config.device)
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a run or a Hugging Face GPT-2 directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a run directory or a Hugging Face GPT-2 directory")
    p.add_argument("--prompt", default="", help="the text to continue (empty: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only within the nucleus of this mass")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples to draw")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(handler=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise GptlabError("--num-samples must be at least 1")
    for i in range(args.num_samples):
        if i:
            print("\n---")
        seed = None if args.seed is None else args.seed + i
        _print_stream(Path(args.model), args.prompt, args.max_new_tokens, args.temperature,
                      args.top_k, args.top_p, seed, args.device)
    return 0


def _print_stream(model_dir: Path, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, seed: int | None, device: str) -> None:
    import torch

    from .checkpoint import load_model
    from .generation import stream_text, validate_sampling
    from .tokenizers import load_tokenizer
    from .train import resolve_device

    try:
        validate_sampling(max_new_tokens, temperature, top_k, top_p)
    except ValueError as exc:
        raise GptlabError(str(exc)) from None
    dev = resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dev).eval()
    ids = tokenizer.encode(prompt) if prompt else _start_ids(tokenizer)
    if len(ids) > model.config.block_size:
        ids = ids[-model.config.block_size:]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    sys.stdout.write(prompt)
    for piece in stream_text(model, tokenizer, ids, max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator=generator):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _start_ids(tokenizer) -> list[int]:
    """With no prompt, start a new document: GPT-2's end-of-text token, or a newline for characters."""
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    try:
        return tokenizer.encode("\n")
    except GptlabError:
        return [0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="A from-scratch GPT-2: prepare a corpus, train, sample, evaluate, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare, _add_train, _add_sample):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except GptlabError as exc:
        print(f"gptlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
