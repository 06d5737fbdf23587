"""Hostile inputs to the commands outside the server (issue 27): each is one line on stderr, exit 2 for
the input and 3 for the environment, and is refused before any work where it can be."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import shutil
import socket

import pyarrow as pa
import pytest
from helpers import TINY_ARGS, TINY_TEXT, one_line_error, snapshot

from gptlab.checkpoint import read_torch_file
from gptlab.inference.loading import load_pretrained
from gptlab.data import prepare
from gptlab.errors import GptlabError
from gptlab.tokenizers import TOKENIZER_FILE, CharTokenizer, load_tokenizer
from gptlab.train.config import TRAIN_PRESETS, build_train_config

# --- 1. damaged compressed inputs, in every format prepare reads ---------------------------------------

COMPRESSORS = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
               ".zst": lambda data: pa.compress(data, "zstd", asbytes=True)}
CODEC_NAMES = {".gz": "gzip", ".xz": "xz", ".bz2": "bz2", ".zst": "zstd"}
DOCS = [f"First Citizen:\nBefore we proceed any further, hear me speak. {i}\n" for i in range(300)]
CONTENTS = {  # each format's file of the same documents
    "txt": "".join(DOCS).encode(),
    "jsonl": "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode(),
    "csv": ("text\n" + "".join(json.dumps(d) + "\n" for d in DOCS)).encode(),
}


def damaged(suffix: str, kind: str, how: str) -> bytes:
    """The compressed file with its header intact: cut in half, or 64 bytes of its body inverted."""
    packed = COMPRESSORS[suffix](CONTENTS[kind])
    if how == "truncated":
        return packed[: len(packed) // 2]
    body = bytearray(packed)
    for k in range(len(body) // 3, len(body) // 3 + 64):
        body[k] ^= 0xFF
    return bytes(body)


@pytest.mark.parametrize("how", ["corrupt", "truncated"])
@pytest.mark.parametrize("kind", sorted(CONTENTS))
@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_a_damaged_compressed_input_is_one_line_in_every_format(tmp_path, gptlab, suffix, kind, how):
    source = tmp_path / f"bad.{kind}{suffix}"
    source.write_bytes(damaged(suffix, kind, how))
    code, _, err = gptlab("prepare", str(source), "--out", str(tmp_path / "out"), "--no-progress")
    one_line_error(code, err, 2, source.name, f"cannot read it as a {CODEC_NAMES[suffix]} file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_a_damaged_compressed_input_read_beside_worker_processes_is_one_line(tmp_path, gptlab, suffix):
    """Two tokenizer processes, a good file before the damaged one; --skip-binary must not skip a
    damaged archive as if it were a binary file (its garbage may decode as bytes that are not UTF-8)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(TINY_TEXT)
    (tmp_path / "in" / f"b.txt{suffix}").write_bytes(damaged(suffix, "txt", "corrupt"))
    for extra in ([], ["--skip-binary"]):
        code, _, err = gptlab("prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "2",
                              "--no-progress", *extra)
        one_line_error(code, err, 2, f"b.txt{suffix}", f"cannot read it as a {CODEC_NAMES[suffix]} file")
        assert not (tmp_path / "out").exists()


# --- 2. a tokenizer that does not belong to the model ---------------------------------------------------


@pytest.mark.parametrize("change", ["fewer", "more"])
def test_a_tokenizer_whose_vocabulary_disagrees_with_the_model_is_refused_at_load(tiny_run, tmp_path, gptlab, change):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    chars = json.loads((run / TOKENIZER_FILE).read_text())["chars"]
    chars = chars[:10] if change == "fewer" else [*chars, "\u00e9", "\u00fc"]
    (run / TOKENIZER_FILE).write_text(json.dumps({"type": "char", "chars": chars}))
    with pytest.raises(GptlabError, match=f"its tokenizer has {len(chars)} tokens but the model's vocabulary"):
        load_pretrained(run)
    code, out, err = gptlab("sample", str(run), "--max-new-tokens", "50", "--seed", "1")
    one_line_error(code, err, 2, str(run), f"tokenizer has {len(chars)} tokens")
    assert out == ""  # refused before anything was generated


def test_a_damaged_tokenizer_file_names_the_file(tiny_run, tmp_path, gptlab):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / TOKENIZER_FILE).write_text(json.dumps({"type": "char", "chars": ["a", "a"]}))
    code, _, err = gptlab("sample", str(run))
    one_line_error(code, err, 2, TOKENIZER_FILE, "duplicate characters")


# --- 3. ngram's options, before the fitting -------------------------------------------------------------


@pytest.mark.parametrize("option, fragment", [
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--seed", str(2**64)], "--seed must be a non-negative integer below 2**63"),
    (["--order", "0"], "--order must be between 1 and 12, got 0"),
    (["--order", "13"], "--order must be between 1 and 12, got 13"),
    (["--sample-tokens", "-1"], "--sample-tokens must be at least 0"),
    (["--prompt", "Zebra~"], "--prompt: character 'Z' at position 0 is not in"),
])
def test_ngram_refuses_each_bad_option_before_fitting(char_data, gptlab, monkeypatch, option, fragment):
    def no_fitting(*args, **kwargs):
        raise AssertionError("the n-gram was fitted before the options were checked")

    monkeypatch.setattr("gptlab.evaluate.ngram.NGramCounts", no_fitting)
    code, _, err = gptlab("ngram", "--data", str(char_data), *option)
    one_line_error(code, err, 2, fragment)


# --- 4. --config: a preset it names, a directory --------------------------------------------------------


def test_a_config_file_naming_an_unknown_preset_is_refused(char_data, tmp_path, gptlab):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"preset": "shakespeare-char-huge"}))
    out = tmp_path / "run"
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(out), "--config", str(config), *TINY_ARGS)
    one_line_error(code, err, 2, "unknown preset 'shakespeare-char-huge'", "known presets: " + ", ".join(TRAIN_PRESETS))
    assert not out.exists()


def test_a_preset_a_config_file_names_is_applied_before_the_files_values(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"preset": "adder", "max_iters": 7}))
    built = build_train_config(config_file=config)
    assert (built.preset, built.task, built.block_size, built.max_iters) == ("adder", "adder", 8, 7)


def test_config_that_is_a_directory_says_so(char_data, tmp_path, gptlab):
    code, _, err = gptlab("train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--config", str(tmp_path))
    one_line_error(code, err, 2, f"config file {tmp_path} is a directory")


# --- 5. eval --max-order --------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["0", "-3", "13"])
def test_eval_refuses_a_max_order_out_of_range_naming_its_own_option(tiny_run, char_data, gptlab, order):
    code, out, err = gptlab("eval", str(tiny_run), "--data", str(char_data), "--baselines", "--max-order", order)
    one_line_error(code, err, 2, f"--max-order must be between 1 and 12, got {order}")
    assert "--order " not in err and out == ""


# --- 6. an unreachable Hugging Face Hub is the environment ------------------------------------------------


@pytest.fixture
def hf_datasets():
    return pytest.importorskip("datasets", reason="the Hugging Face tests need the datasets extra (make test has it)")


def test_an_unresolvable_hub_is_one_line_and_exit_3_at_once(tmp_path, gptlab, hf_datasets, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("the datasets library was asked (and would retry for half a minute)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(hf_datasets, "load_dataset", never)
    code, _, err = gptlab("prepare", "--hf-dataset", "some/name", "--out", str(tmp_path / "out"))
    one_line_error(code, err, 3, "cannot reach the Hugging Face Hub", "some/name", "check the network")


def test_a_hub_that_fails_after_retries_is_one_line_exit_3_and_the_retries_are_not_logged(
    tmp_path, gptlab, hf_datasets, monkeypatch
):
    heard = []

    def unreachable(*args, **kwargs):
        retry_logger = logging.getLogger("huggingface_hub.utils._http")
        heard.append(retry_logger.isEnabledFor(logging.WARNING))  # what would print each retry
        raise ConnectionError("Couldn't reach 'some/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("gptlab.data.inputs._check_hub_reachable", lambda *args: None)
    monkeypatch.setattr(hf_datasets, "load_dataset", unreachable)
    code, _, err = gptlab("prepare", "--hf-dataset", "some/name", "--out", str(tmp_path / "out"))
    one_line_error(code, err, 3, "cannot reach the Hugging Face dataset 'some/name'")
    assert heard == [False]
    assert logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING)  # put back after


def test_a_local_looking_dataset_path_that_does_not_exist_is_the_input(tmp_path, gptlab, hf_datasets):
    code, _, err = gptlab("prepare", "--hf-dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    one_line_error(code, err, 2, "no such directory or file")


# --- 7. a damaged training state --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_training_state_is_one_plain_line_naming_the_file(tiny_run, tmp_path, gptlab, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = run / "training_state.pt"
    state.write_bytes(b"not a checkpoint\n" if damage == "garbage" else state.read_bytes()[:4096])
    before = snapshot(run)
    code, _, err = gptlab("train", "--resume", "--out", str(run), "--no-progress")
    one_line_error(code, err, 2, str(state), "not a readable training state", "damaged, truncated")
    assert "weights_only" not in err and "torch.load" not in err
    assert snapshot(run) == before


def test_a_damaged_pytorch_weights_file_gives_no_advice_to_unpickle_it(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(GptlabError) as caught:
        read_torch_file(tmp_path / "pytorch_model.bin", "PyTorch state dict")
    assert "weights_only" not in str(caught.value) and len(str(caught.value).splitlines()) == 1


# --- 8. the validation split ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", ["0", "1", "-0.1", "nan", "inf"])
def test_prepare_refuses_a_validation_fraction_outside_0_1_and_says_why(tiny_corpus, tmp_path, gptlab, fraction):
    code, _, err = gptlab("prepare", str(tiny_corpus), "--out", str(tmp_path / "out"), "--val-fraction", fraction)
    one_line_error(code, err, 2, "--val-fraction must be above 0 and below 1", "validation loss")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fraction, fragment", [
    (0.0, "has no validation split (prepared with --val-fraction 0)"),
    (0.001, "prepare it again with a larger --val-fraction"),
])
def test_train_names_a_missing_or_short_validation_split_as_the_cause(tiny_corpus, tmp_path, gptlab, fraction, fragment):
    prepare([str(tiny_corpus)], "char", tmp_path / "data", val_fraction=fraction)  # the library still allows 0
    code, _, err = gptlab("train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY_ARGS)
    one_line_error(code, err, 2, fragment)
    assert "use a smaller --block-size or more data" not in err


# --- 9. transformers reads a character-level run ------------------------------------------------------------


def test_transformers_reads_an_exported_character_run_with_gptlabs_ids(tiny_run, tmp_path, gptlab):
    transformers = pytest.importorskip("transformers", reason="the test compares with transformers (the test extra)")
    out = tmp_path / "export"
    assert gptlab("export", str(tiny_run), str(out))[0] == 0
    ours = load_tokenizer(out)
    text = TINY_TEXT[:300]  # capitals, punctuation, spaces, blank lines
    for directory in (out, tiny_run):
        theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == text
        assert theirs.convert_ids_to_tokens(ids[:5]) == list(text[:5])


def test_transformers_reads_a_character_vocabulary_of_any_unicode(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the test compares with transformers (the test extra)")
    text = "def x(y):\r\n\treturn 'ünïcödé' + \"🙂\"  # < > [UNK] </s>\n"
    ours = CharTokenizer.from_text(text)
    ours.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text) and len(ids) == len(text)
    assert theirs.decode(ids) == text
    assert len(theirs) == ours.vocab_size


# --- 10. the sweep: further hostile values of every option these commands own ---------------------------


@pytest.fixture
def hostile_files(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "array.json").write_text("[1, 2]")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "not-json.json").write_text("n_layer = 4")
    (tmp_path / "bad-type.json").write_text('{"n_layer": "four"}')
    (tmp_path / "a.txt").write_text("some text\n")
    return tmp_path


# (arguments, exit status, fragment); DATA, RUN and F/ stand for the prepared data, the run and hostile_files
SWEEP = [
    (["prepare", "F/a.txt", "--out", "F/o", "--shard-tokens", "0"], 2, "--shard-tokens must be at least 1"),
    (["prepare", "F/a.txt", "--out", "F/o", "--workers", "-1"], 2, "--workers must be at least 1"),
    (["prepare", "F/missing.txt", "--out", "F/o"], 2, "does not exist"),
    (["prepare", "F/empty.txt", "--out", "F/o"], 2, "the corpus is empty"),
    (["prepare", "F/adir", "--out", "F/o"], 2, "contains no files"),
    (["prepare", "F/a.txt", "--out", "F/a.txt"], 2, "F/a.txt"),
    (["prepare", "F/a.txt", "--out", "F/o", "--text-field", ""], 2, "text_field"),
    (["train", "--config", "F/missing.json", "--data", "DATA", "--out", "F/r"], 2, "config file not found"),
    (["train", "--config", "F/empty.json", "--data", "DATA", "--out", "F/r"], 2, "not a readable JSON file"),
    (["train", "--config", "F/not-json.json", "--data", "DATA", "--out", "F/r"], 2, "not a readable JSON file"),
    (["train", "--config", "F/array.json", "--data", "DATA", "--out", "F/r"], 2, "must hold a JSON object"),
    (["train", "--config", "F/bad-type.json", "--data", "DATA", "--out", "F/r"], 2, "n_layer must be an integer"),
    (["train", "--data", "F/missing", "--out", "F/r"], 2, "F/missing"),
    (["train", "--data", "F/a.txt", "--out", "F/r"], 2, "F/a.txt"),
    (["train", "--data", "F/adir", "--out", "F/r"], 2, "F/adir"),
    (["train", "--data", "DATA", "--out", "F/r", "--max-time", "nan"], 2, "--max-time must be a finite number"),
    (["train", "--data", "DATA", "--out", "F/r", "--max-time", "-1"], 2, "--max-time must not be negative"),
    (["train", "--data", "DATA", "--out", "F/r", "--n-layer", "0"], 2, "n_layer"),
    (["train", "--data", "DATA", "--out", "F/r", "--n-head", "3"], 2, "n_head"),
    (["train", "--data", "DATA", "--out", "F/r", "--lr", "0"], 2, "lr > 0"),
    (["train", "--data", "DATA", "--out", "F/r", "--nproc", "0"], 2, "--nproc must be at least 1"),
    (["train", "--data", "DATA", "--out", "F/r", "--eval-tasks", "x", "--eval-tasks-path", "F/missing"], 2,
     "--eval-tasks-path F/missing: no such directory"),
    (["train", "--resume", "--out", "F/missing"], 2, "F/missing"),
    (["train", "--resume", "--out", "F/adir"], 2, "F/adir"),
    (["ngram", "--data", "F/missing"], 2, "F/missing"),
    (["ngram", "--data", "F/adir"], 2, "F/adir"),
    (["eval", "RUN", "--data", "DATA", "--stride", "0"], 2, "--stride must be at least 1"),
    (["eval", "RUN", "--data", "DATA", "--context", "-1"], 2, "--context must be at least 1"),
    (["eval", "RUN", "--text", "F/empty.txt"], 2, "the text has 0 token(s)"),
    (["eval", "RUN", "--text", "F/adir"], 2, "F/adir"),
    (["eval", "F/adir", "--data", "DATA"], 2, "F/adir"),
    (["eval", "F/a.txt", "--data", "DATA"], 2, "is a file"),
    (["eval", "RUN", "--tasks", "x", "--limit", "nan"], 2, "--limit must be a positive number"),
    (["eval", "RUN", "--tasks", "x", "--limit", "-1"], 2, "--limit must be a positive number"),
    (["eval", "RUN", "--tasks", "x", "--num-fewshot", "-1"], 2, "--num-fewshot must be at least 0"),
    (["export", "RUN", "RUN"], 2, "already holds files"),
    (["export", "F/missing", "F/e"], 2, "no such directory"),
    (["export", "RUN", "F/a.txt"], 2, "not a directory"),
    (["sample", "RUN", "--temperature", "nan"], 2, "temperature"),
    (["sample", "RUN", "--top-p", "nan"], 2, "top_p"),
    (["sample", "RUN", "--seed", "-1"], 2, "seed"),
    (["sample", "RUN", "--num-samples", "0"], 2, "--num-samples must be at least 1"),
    (["sample", "RUN", "--prompt", "Zebra~"], 2, "'Z'"),
    (["sample", "F/adir"], 2, "no config.json"),
]


@pytest.mark.parametrize("argv, expected, fragment", SWEEP, ids=[" ".join(case[0]) for case in SWEEP])
def test_hostile_values_of_every_option_are_one_line(hostile_files, char_data, tiny_run, gptlab, argv, expected, fragment):
    def real(arg: str) -> str:
        return arg.replace("DATA", str(char_data)).replace("RUN", str(tiny_run)).replace("F/", f"{hostile_files}/")

    before = snapshot(tiny_run)
    code, _, err = gptlab(*map(real, argv))
    one_line_error(code, err, expected, real(fragment))
    assert snapshot(tiny_run) == before
    assert not any((hostile_files / name).exists() for name in ("o", "r", "e"))
