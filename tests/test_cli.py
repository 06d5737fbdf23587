"""End to end through the command line: prepare -> train -> sample, and every bad input of the core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_RUN

from gptlab.cli import main

TRAIN_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()]


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_help_lists_subcommands_and_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("prepare", "train", "sample"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--n-layer" in out and "default: 4" in out and "--max-time" in out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "(default: 0.8)" in capsys.readouterr().out


def test_sample_and_serve_options_come_from_their_dataclasses_with_the_same_defaults() -> None:
    """`sample`'s sampling options are SamplingParams fields, `serve`'s limits ServerLimits fields: one
    definition each, with the defaults and option names the commands always had."""
    from dataclasses import fields

    from gptlab.cli import build_parser
    from gptlab.serve.limits import ServerLimits

    parser = build_parser()
    sample = vars(parser.parse_args(["sample", "RUN"]))
    assert {k: sample[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                                   "seed", "stop")} == dict(max_new_tokens=200, temperature=0.8, top_k=None,
                                                            top_p=None, repetition_penalty=1.0, seed=None, stop=[])
    assert parser.parse_args(["sample", "RUN", "--stop", "a", "--stop", "b", "--top-k", "3"]).stop == ["a", "b"]
    serve = parser.parse_args(["serve", "RUN", "--max-tokens-limit", "8", "--kv-cache-mb", "2"])
    limits = ServerLimits(**{f.name: getattr(serve, f.name) for f in fields(ServerLimits)})
    assert limits == ServerLimits(max_tokens=8, kv_cache_mb=2)
    assert ServerLimits() == ServerLimits(max_tokens=256, max_body_bytes=1 << 20, max_choices=16, max_batch=16,
                                          max_queue=64, kv_cache_mb=1024)


@pytest.mark.slow
def test_prepare_train_sample_end_to_end(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    code, stdout, _ = run(["prepare", str(tiny_corpus), "--out", str(data)], capsys)
    assert code == 0 and "train and" in stdout
    code, stdout, _ = run(["train", "--data", str(data), "--out", str(out), "--no-progress",
                           *TRAIN_ARGS, "--sample-tokens=40"], capsys)
    assert code == 0
    assert "--- sample ---" in stdout
    for name in ("config.json", "model.safetensors", "gptlab_tokenizer.json", "train_config.json",
                 "training_state.pt", "metrics.jsonl", "loss.png", "best/model.safetensors"):
        assert (out / name).is_file(), name
    first_loss = losses(out)[5]
    last_loss = losses(out)[30]
    assert last_loss < first_loss
    code, stdout, _ = run(["sample", str(out), "--prompt", "All:", "--max-new-tokens", "25", "--seed", "3"], capsys)
    assert code == 0
    assert stdout.startswith("All:")
    assert len(stdout.rstrip("\n")) == len("All:") + 25  # one character per token
    code, again, _ = run(["sample", str(out), "--prompt", "All:", "--max-new-tokens", "25", "--seed", "3"], capsys)
    assert again == stdout


@pytest.mark.slow
def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    gptlab = Path(sys.executable).with_name("gptlab")
    result = subprocess.run([str(gptlab), "sample", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "nowhere" in result.stderr


@pytest.mark.slow
def test_seed_makes_runs_identical(tmp_path: Path, char_data: Path, capsys) -> None:
    runs = []
    for name in ("a", "b"):
        code, _, _ = run(["train", "--data", str(char_data), "--out", str(tmp_path / name), "--no-progress",
                          *TRAIN_ARGS, "--max-iters=10", "--seed=7"], capsys)
        assert code == 0
        runs.append(losses(tmp_path / name))
    assert runs[0] == runs[1]
    code, _, _ = run(["train", "--data", str(char_data), "--out", str(tmp_path / "c"), "--no-progress",
                      *TRAIN_ARGS, "--max-iters=10", "--seed=8"], capsys)
    assert losses(tmp_path / "c") != runs[0]


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(tmp_path: Path, char_data: Path, capsys) -> None:
    out = tmp_path / "run"
    base = ["train", "--data", str(char_data), "--out", str(out), "--no-progress", *TRAIN_ARGS]
    assert run([*base, "--max-iters=20"], capsys)[0] == 0
    code, stdout, _ = run(["train", "--out", str(out), "--resume", "--no-progress", "--max-iters=30"], capsys)
    assert code == 0
    assert "30 steps" in stdout
    steps = sorted(losses(out))
    assert steps == [5, 10, 15, 20, 25, 30]


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path: Path, char_data: Path, capsys) -> None:
    out = tmp_path / "run"
    base = ["train", "--data", str(char_data), "--out", str(out), "--no-progress", *TRAIN_ARGS, "--max-iters=5"]
    assert run(base, capsys)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(base, capsys)
    assert_one_line_error(code, err, "already holds a run", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    assert run([*base, "--overwrite", "--seed=99"], capsys)[0] == 0
    assert (out / "model.safetensors").read_bytes() != before


@pytest.mark.parametrize(
    "make_input, fragment",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: _write(d / "empty.txt", b"   \n"), "empty"),
        (lambda d: _write(d / "binary.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00"), "NUL"),
        (lambda d: _write(d / "latin1.txt", "caf\xe9 au lait".encode("latin-1")), "not UTF-8"),
    ],
    ids=["missing", "empty", "binary", "not-utf8"],
)
def test_prepare_bad_inputs(tmp_path: Path, capsys, make_input, fragment: str) -> None:
    path = make_input(tmp_path)
    code, _, err = run(["prepare", str(path), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out" / "meta.json").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_corpus_shorter_than_a_context_window(tmp_path: Path, capsys) -> None:
    corpus = _write(tmp_path / "short.txt", b"to be or not to be, that is the question\n" * 3)
    assert run(["prepare", str(corpus), "--out", str(tmp_path / "d")], capsys)[0] == 0
    code, _, err = run(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *TRAIN_ARGS,
                        "--block-size=64"], capsys)
    assert_one_line_error(code, err, "fewer than one context window")


def test_prompt_outside_the_character_vocabulary(tiny_run: Path, capsys) -> None:
    code, _, err = run(["sample", str(tiny_run), "--prompt", "héllo"], capsys)
    assert_one_line_error(code, err, "'é'", "position 1")


def test_run_dir_without_a_checkpoint(tmp_path: Path, capsys) -> None:
    code, _, err = run(["sample", str(tmp_path)], capsys)
    assert_one_line_error(code, err, str(tmp_path))


def test_contradictory_and_invalid_options(tmp_path: Path, tiny_run: Path, capsys) -> None:
    code, _, err = run(["train", "--out", str(tiny_run), "--resume", "--overwrite"], capsys)
    assert_one_line_error(code, err, "contradict")
    code, _, err = run(["train", "--resume"], capsys)
    assert_one_line_error(code, err, "--resume needs --out")
    code, _, err = run(["train", "--out", str(tmp_path / "fresh"), "--resume"], capsys)
    assert_one_line_error(code, err, "to resume from")
    code, _, err = run(["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(["train", "--n-embd=30", "--n-head=4", "--data", str(tmp_path), "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "divisible by n_head")
    code, _, err = run(["sample", str(tiny_run), "--top-p", "1.5"], capsys)
    assert_one_line_error(code, err, "top_p")


def test_version_and_plain_gptlab_print_help(gptlab, capsys: pytest.CaptureFixture) -> None:
    from gptlab import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"gptlab {__version__}\n"
    code, out, err = gptlab()
    assert code == 0 and "usage: gptlab" in out and "train" in out and err == ""


def test_the_command_line_and_prepare_import_no_torch() -> None:
    """`gptlab --version`, the help and `prepare` (with the workers it forks) must not pay for torch."""
    code = ("import sys; from gptlab.cli import build_parser; build_parser(); "
            "from gptlab.data import prepare; import gptlab; gptlab.__version__; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
