"""Training options: every value training cannot use is one line and exit 2 before anything runs, and
every option's help line comes from TrainConfig's fields, with its unit, default and choices."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import TINY_ARGS, one_line_error

from gptlab.cli import build_parser
from gptlab.train.config import FIELD_CHOICES, TrainConfig, build_train_config


@pytest.mark.parametrize("option, value, fragment", [
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--max-time", "inf", "--max-time must be a finite number"),
    ("--min-lr", "-inf", "--min-lr must be a finite number"),
    ("--dropout", "nan", "--dropout must be a finite number"),
    ("--beta1", "1.0", "--beta1 must be in [0, 1), got 1.0"),
    ("--beta2", "-0.1", "--beta2 must be in [0, 1)"),
    ("--seed", "-1", "--seed must not be negative, got -1"),
    ("--seed", str(2**64), "--seed must be below 2**63"),
    ("--weight-decay", "-0.5", "--weight-decay must not be negative"),
    ("--grad-clip", "-1", "--grad-clip must not be negative"),
    ("--warmup-fraction", "1", "--warmup-fraction must be in [0, 1)"),
    ("--lr-decay-iters", "-5", "--lr-decay-iters must not be negative"),
    ("--sample-tokens", "-1", "--sample-tokens must not be negative"),
    ("--on-nonfinite", "ignore", "--on-nonfinite must be one of stop, skip"),
    ("--dtype", "float8", "--dtype must be one of"),
])
def test_a_value_training_cannot_use_is_one_line(
    char_data: Path, tmp_path: Path, gptlab, option: str, value: str, fragment: str
) -> None:
    out = tmp_path / "run"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS,
                          f"{option}={value}")
    one_line_error(code, err, 2, fragment)
    assert not out.exists()


@pytest.mark.parametrize("values, fragment", [
    ({"n_layer": "4"}, "n_layer must be an integer, got '4'"),
    ({"n_layer": 4.0}, "n_layer must be an integer, got 4.0"),
    ({"lr": "fast"}, "lr must be a finite number, got 'fast'"),
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),  # json.dumps writes NaN, json.loads reads it
    ({"compile": "yes"}, "compile must be true or false, got 'yes'"),
    ({"batch_size": True}, "batch_size must be an integer, got True"),
    ({"data": 7}, "data must be a string, got 7"),
    ({"optimizer": None}, "optimizer must be a string, got None"),
])
def test_a_config_file_with_values_of_the_wrong_type_is_one_line(
    char_data: Path, tmp_path: Path, gptlab, values: dict, fragment: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(values))
    out = tmp_path / "run"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--config", str(config), *TINY_ARGS)
    one_line_error(code, err, 2, f"config file {config}: {fragment}")
    assert not out.exists()


def test_integers_are_accepted_for_float_options(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"lr": 1, "max_time": 60}))
    built = build_train_config(config_file=config)
    assert (built.lr, built.max_time) == (1.0, 60.0) and type(built.lr) is float


@pytest.mark.parametrize("sizes, fragment", [
    (["--n-embd=65536", "--n-head=64", "--n-layer=512"], "parameters with their gradients"),
    (["--batch-size=1000000000"], "micro-batches of 32,000,000,000 tokens"),
], ids=["model", "batch"])
def test_sizes_that_cannot_fit_in_memory_are_refused_before_allocating(
    char_data: Path, tmp_path: Path, gptlab, sizes: list[str], fragment: str
) -> None:
    out = tmp_path / "run"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--no-progress", *TINY_ARGS, *sizes)
    one_line_error(code, err, 2, "this run needs at least", fragment, "choose a smaller")
    assert not out.exists()


def test_every_train_option_has_a_help_line_with_its_default_and_choices() -> None:
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    actions = {a.dest: a for a in train._actions}
    for f in fields(TrainConfig):
        text = actions[f.name].help
        assert text.startswith(f.metadata["help"].replace("%", "%%")), f.name
        assert "(default: " in text, f.name
        for choice in FIELD_CHOICES.get(f.name, ()):
            assert choice in text, (f.name, choice)
    assert "seconds of training" in actions["max_time"].help  # its unit, and what it counts
    assert "not the set-up, nor the final evaluation and report" in actions["max_time"].help
