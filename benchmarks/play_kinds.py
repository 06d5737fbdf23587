"""The built-in task, end to end: which kind of play (the First Folio's comedy, history or tragedy) a passage
of Shakespeare comes from, a GPT fine-tuned for it against non-neural baselines and chance.

The steps, each the real command line in a fresh process where gptlab has one, and timed:
1. the demo's pretrained character-level run: `gptlab train` with no data (the built-in corpus, the
   `shakespeare-char-default` preset, 4 minutes), or the run given with `--base`;
2. the built-in task (`--data shakespeare-kinds`, `gptlab.data.play_kinds.builtin_task`): passages as long as the base's context
   (64 characters for the demo), 30 plays for training and 6 held out for validation, two of each kind,
   from which 1,000 passages of each kind are scored (balanced, so that chance is 1/3, and quick to
   score: 8 s for a fine-tuned demo run at load 2, where all 14,801 took 221 s in a run at load 3.5);
3. the base fine-tuned as a classifier, every weight (`gptlab train --init-from BASE --task classify
   --data shakespeare-kinds`) and with LoRA rank 8 (`--lora-rank 8`), each for the same time, with GPT-1's auxiliary
   language-modelling loss (`--lm-loss-weight 0.5`), then scored by `gptlab eval RUN --data shakespeare-kinds --json`;
4. the baselines (`gptlab.evaluate.text_classifiers`): the majority class, uniform guessing, a bag of
   characters and character 1-4-grams with naive Bayes, fitted on the same training passages.
The table gives each method's validation accuracy, chance, its training time on this machine and its
trainable parameters; the results file adds each confusion matrix.

What the score means: the validation plays are plays the classifier never saw a label of, so it measures
what tells a kind apart across plays, not what tells a play apart. One thing is shared: the demo's
pretraining read the whole built-in corpus as plain text, the held-out plays included (never their kinds).

About 10 minutes on 2 CPU cores at load 2 to 3 (4.5 pretraining, under 3 for each fine-tuning with its
scoring, 10 s for the task's files and the baselines):

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/play_kinds.py
    .venv/bin/python benchmarks/play_kinds.py --base runs/shakespeare-char-default-1   # reuse a demo run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

from gptlab.checkpoint import read_model_config
from gptlab.data.labeled import TaskEvaluation
from gptlab.data.play_kinds import BUILTIN_VAL_PER_KIND, HELD_OUT, LABELS, PLAYS, builtin_task, class_counts
from gptlab.evaluate.text_classifiers import baselines

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

GPTLAB = [sys.executable, "-m", "gptlab"]
TASK = "shakespeare-kinds"  # the built-in task, as a newcomer names it
TUNE = ["--task", "classify", "--lm-loss-weight", "0.5", "--optimizer", "adamw", "--batch-size", "32",
        "--decay-by-time", "--warmup-fraction", "0.05", "--eval-interval", "0", "--eval-iters", "10",
        "--sample-tokens", "0", "--max-iters", "1000000"]
LEARNING_RATES = {"full": ("1e-3", "1e-4"), "lora": ("5e-3", "5e-4")}  # (--lr, --min-lr): LoRA takes larger steps


def run(args: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """One gptlab command in a fresh process: its wall seconds and stdout; its stderr shown if it fails."""
    start = time.perf_counter()
    done = subprocess.run([*GPTLAB, *args], capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"play_kinds: `gptlab {' '.join(args)}` failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return seconds, done.stdout


def pretrain(work: Path, seconds: float) -> tuple[Path, float]:
    """The demo's run: `gptlab train` with no data (its preset), given `seconds` of training. It runs in `work`,
    so the corpus it prepares (data/shakespeare-char, timed with it, as a fresh checkout's `make demo`) goes there."""
    base = work / "base"
    took, _ = run(["train", "--out", str(base), "--max-time", str(seconds), "--no-progress", "--sample-tokens", "0"],
                  cwd=work)
    return base, took


def trainable_parameters(run_dir: Path) -> int:
    """The parameters the run trained: what its report says, else every tensor it saved (a LoRA run saves
    its adapters and head alone, as peft does; a full fine-tuning saves the whole model)."""
    report = json.loads((run_dir / "report.json").read_text())
    if "trainable_parameters" in report:
        return int(report["trainable_parameters"])
    weights = run_dir / "adapter_model.safetensors"
    weights = weights if weights.is_file() else run_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def scored(printed: str, run_dir: Path) -> TaskEvaluation:
    """`gptlab eval RUN --data shakespeare-kinds --json`, read back and checked: its accuracy is its confusion's."""
    try:
        result = json.loads(printed)
        evaluation = TaskEvaluation("classify", result["source"], result["count"], result["correct"],
                                    tuple(result["labels"]), result["confusion"])
    except (json.JSONDecodeError, KeyError) as exc:
        sys.exit(f"play_kinds: `gptlab eval {run_dir} --json` printed no classifier result ({exc}):\n{printed[-2000:]}")
    if evaluation.labels != LABELS or sum(evaluation.confusion[i][i] for i in range(len(LABELS))) != evaluation.correct:
        sys.exit(f"play_kinds: `gptlab eval {run_dir} --json`: labels or confusion do not add up: {printed[-2000:]}")
    return evaluation


def fine_tune(kind: str, base: Path, work: Path, seconds: float) -> dict:
    lr, min_lr = LEARNING_RATES[kind]
    out = work / kind
    extra = ["--lora-rank", "8"] if kind == "lora" else []
    took, _ = run(["train", "--init-from", str(base), "--data", TASK, "--out", str(out), *TUNE, *extra,
                   "--lr", lr, "--min-lr", min_lr, "--max-time", str(seconds), "--no-progress"])
    eval_seconds, printed = run(["eval", str(out), "--data", TASK, "--json"])
    report = json.loads((out / "report.json").read_text())
    return {"result": scored(printed, out), "seconds": took, "eval_seconds": eval_seconds,
            "parameters": trainable_parameters(out), "steps": report.get("steps"),
            "options": [*TUNE, *extra, "--lr", lr, "--min-lr", min_lr, "--max-time", str(seconds)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, help="a pretrained run to fine-tune (default: pretrain the demo's)")
    parser.add_argument("--pretrain-seconds", type=float, default=240.0,
                        help="--max-time of the demo's pretraining (its preset: 240)")
    parser.add_argument("--tune-seconds", type=float, default=150.0, help="--max-time of each fine-tuning")
    parser.add_argument("--work", type=Path, help="keep the runs and task files here (default: a temporary directory)")
    parser.add_argument("--out", default="play_kinds", help="results name: benchmarks/results/OUT.{json,md}")
    args = parser.parse_args()
    if not re.fullmatch(r"\w+", args.out):
        parser.error(f"--out must be a plain name (letters, digits, _), got {args.out!r}")
    if args.base is not None and not (args.base / "config.json").is_file():
        parser.error(f"--base {args.base}: not a run directory (no config.json)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        base, pretrain_seconds = (args.base.resolve(), None) if args.base else pretrain(work, args.pretrain_seconds)
        base_report = json.loads((base / "report.json").read_text()) if (base / "report.json").is_file() else {}
        context = read_model_config(base).block_size
        start = time.perf_counter()
        examples = builtin_task(context)  # what `--data shakespeare-kinds` reads for this base
        write_seconds = time.perf_counter() - start
        passage_chars = max(len(text) for text, _ in examples["train"])
        found = baselines(examples["train"], examples["val"], LABELS)
        tuned = {kind: fine_tune(kind, base, work, args.tune_seconds) for kind in ("full", "lora")}
    load_after = os.getloadavg()[0]
    majority, uniform = found[0].result.accuracy, 1 / len(LABELS)
    methods: list[tuple[str, TaskEvaluation | None, float, int, dict]] = [  # name, score, seconds, parameters, more
        ("uniform guessing", None, 0.0, 0, {}),
        *((b.name, b.result, b.fit_seconds, b.parameters, {}) for b in found),
        *((name, t["result"], t["seconds"], t["parameters"],
           {"steps": t["steps"], "eval_seconds": t["eval_seconds"], "options": t["options"]})
          for name, t in (("GPT, full fine-tuning", tuned["full"]), ("GPT, LoRA rank 8", tuned["lora"]))),
    ]
    counts = class_counts(examples)
    held_out = [PLAYS[s][0] for s in HELD_OUT]
    results = {
        "machine": MACHINE, "labels": list(LABELS), "passage_chars": passage_chars, "held_out": held_out,
        "val_per_kind": BUILTIN_VAL_PER_KIND,
        "class_counts": counts, "chance": {"majority_class": majority, "uniform": uniform},
        "rows": [{"method": name, "accuracy": score.accuracy if score else uniform, "seconds": seconds,
                  "parameters": parameters, "confusion": score.to_dict() if score else None, **more}
                 for name, score, seconds, parameters, more in methods],
        "base": {"path": str(args.base) if args.base else "the demo's run, pretrained here",
                 "pretrain_seconds": pretrain_seconds, "steps": base_report.get("steps"),
                 "val_loss": base_report.get("val_loss")},
        "write_seconds": write_seconds, "tune_seconds": args.tune_seconds,
        "load_before": round(load_before, 2), "load_after": round(load_after, 2),
    }
    base_line = (f"Base: {results['base']['path']}" + (f", {pretrain_seconds:.0f} s" if pretrain_seconds else "")
                 + (f", {base_report['steps']:,} steps, validation loss {base_report['val_loss']:.4f}"
                    if base_report else ""))
    table = [
        "# Which kind of play: a fine-tuned GPT against baselines", "",
        f"Machine: {MACHINE}; load average {load_before:.2f} before / {load_after:.2f} after.", "",
        f"Passages of at most {passage_chars} characters (whole lines) from the First Folio's 36 plays. Validation: "
        f"{', '.join(held_out)}, never trained on"
        + f", the first {BUILTIN_VAL_PER_KIND:,} passages of each kind ("
        + ", ".join(f"{counts['val'][k]:,} {k}" for k in LABELS) + " passages); training: the other 30 plays ("
        + ", ".join(f"{counts['train'][k]:,} {k}" for k in LABELS) + "). Written by `benchmarks/play_kinds.py`.", "",
        "| method | validation accuracy | chance (majority / uniform) | train time | trainable parameters |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {name} | **{score.accuracy if score else uniform:.1%}** | {majority:.1%} / {uniform:.1%} | "
          f"{seconds:.1f} s | {parameters:,} |" for name, score, seconds, parameters, _ in methods], "",
        f"{base_line}. Each fine-tuning: {args.tune_seconds:.0f} s of training (`--max-time`); its time above is the "
        "whole command. Naive Bayes's parameters: a log-probability per feature and label, and the label priors. "
        "The demo's pretraining read every play as plain text, the held-out ones included, never their kinds.", "",
    ]
    for name, score, *_ in methods:
        if score:
            table += [f"## {name}", "", score.table(), ""]
    save_results(args.out, results, "\n".join(table))


if __name__ == "__main__":
    main()
