import hashlib
import json

import numpy as np
import pytest
import torch

from gptlab.data import TokenDataset, default_corpus_files, prepare, resolve_inputs
from gptlab.errors import GptlabError
from gptlab.tokenizers import TOKENIZER_FILE, CharTokenizer, GPT2Tokenizer

TEXT_A = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
TEXT_B = "All:\nSpeak, speak. Ünïcödé too 🙂\n"


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (src / "sub" / "b.txt").write_text(TEXT_B, encoding="utf-8")
    return src


def read_split(out, name, dtype=np.uint16):
    return np.fromfile(out / f"{name}.bin", dtype=dtype)


def test_prepare_char_single_file_round_trip(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus / "a.txt")], "char", out)
    tok = CharTokenizer.from_text(TEXT_A)
    train, val = read_split(out, "train"), read_split(out, "val")
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == TEXT_A
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "char"
    assert meta["vocab_size"] == tok.vocab_size
    assert meta["dtype"] == "uint16"
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["val_fraction"] == 0.1
    raw = (corpus / "a.txt").read_bytes()
    assert meta["sources"] == [
        {"path": str((corpus / "a.txt").resolve()), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    ]
    assert json.loads((out / TOKENIZER_FILE).read_text())["type"] == "char"
    assert sorted(p.name for p in out.iterdir()) == ["gptlab_tokenizer.json", "meta.json", "train.bin", "val.bin"]


def test_prepare_val_is_the_last_fraction(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus / "a.txt")], "char", out, val_fraction=0.25)
    ids = CharTokenizer.from_text(TEXT_A).encode(TEXT_A)
    n_train = int(len(ids) * 0.75)
    assert meta["train_tokens"] == n_train
    assert read_split(out, "train").tolist() == ids[:n_train]
    assert read_split(out, "val").tolist() == ids[n_train:]


def test_prepare_zero_val_fraction(corpus, tmp_path):
    meta = prepare([str(corpus / "a.txt")], "char", tmp_path / "out", val_fraction=0.0)
    assert meta["val_tokens"] == 0
    assert len(TokenDataset(tmp_path / "out").split("val")) == 0


def test_prepare_directory_joins_sorted_files(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus)], "char", out)
    text = TEXT_A + "\n\n" + TEXT_B
    tok = CharTokenizer.from_text(text)
    assert tok.decode(read_split(out, "train").tolist() + read_split(out, "val").tolist()) == text
    assert [s["path"] for s in meta["sources"]] == [str((corpus / "a.txt").resolve()), str((corpus / "sub" / "b.txt").resolve())]


def test_prepare_gpt2_separates_documents_with_eos(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus)], "gpt2", out)
    tok = GPT2Tokenizer()
    ids = read_split(out, "train").tolist() + read_split(out, "val").tolist()
    assert ids == tok.encode(TEXT_A) + [50256] + tok.encode(TEXT_B)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert meta["train_tokens"] == int(len(ids) * 0.9)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    assert isinstance(TokenDataset(out).tokenizer, GPT2Tokenizer)


def test_resolve_inputs_glob_dedup_and_sort(corpus):
    files = resolve_inputs([str(corpus / "**" / "*.txt"), str(corpus / "a.txt"), str(corpus / "sub")])
    assert files == [(corpus / "a.txt").resolve(), (corpus / "sub" / "b.txt").resolve()]


def test_prepare_glob_input(corpus, tmp_path):
    meta = prepare([str(corpus / "sub" / "*.txt")], "char", tmp_path / "out")
    assert [s["path"] for s in meta["sources"]] == [str((corpus / "sub" / "b.txt").resolve())]


def test_prepare_skips_its_own_output_dir(corpus):
    prepare([str(corpus)], "char", corpus / "prepared")
    meta = prepare([str(corpus)], "char", corpus / "prepared", overwrite=True)
    assert len(meta["sources"]) == 2


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: str(d / "missing.txt"), "does not exist"),
        (lambda d: str(d / "*.nothing"), "no files match"),
    ],
)
def test_prepare_missing_inputs(tmp_path, make_input, message):
    with pytest.raises(GptlabError, match=message):
        prepare([make_input(tmp_path)], "char", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "corpus is empty"),
        (b"  \n\t\n", "corpus is empty"),
        (b"text\x00with a NUL", "contains NUL bytes"),
        ("caf\u00e9 latin-1".encode("latin-1"), "not UTF-8"),
    ],
)
def test_prepare_bad_files(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(GptlabError, match=message) as info:
        prepare([str(bad)], "char", tmp_path / "out")
    if message != "corpus is empty":
        assert "bad.txt" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_prepare_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="contains no files"):
        prepare([str(tmp_path / "empty")], "char", tmp_path / "out")


def test_prepare_refuses_existing_output_without_overwrite(corpus, tmp_path):
    out = tmp_path / "out"
    prepare([str(corpus / "a.txt")], "char", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(GptlabError, match="--overwrite"):
        prepare([str(corpus)], "gpt2", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    meta = prepare([str(corpus)], "gpt2", out, overwrite=True)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert isinstance(TokenDataset(out).tokenizer, GPT2Tokenizer)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_prepare_bad_val_fraction(corpus, tmp_path, fraction):
    with pytest.raises(GptlabError, match="val_fraction"):
        prepare([str(corpus)], "char", tmp_path / "out", val_fraction=fraction)


def test_prepare_unknown_tokenizer(corpus, tmp_path):
    with pytest.raises(GptlabError, match="unknown tokenizer"):
        prepare([str(corpus)], "bpe", tmp_path / "out")


@pytest.fixture
def dataset(tmp_path):
    src = tmp_path / "text.txt"
    src.write_text("".join(chr(ord("a") + i % 26) for i in range(1000)), encoding="utf-8")
    prepare([str(src)], "char", tmp_path / "data")
    return TokenDataset(tmp_path / "data")


def test_dataset_splits_are_memmaps(dataset):
    assert isinstance(dataset.split("train"), np.memmap)
    assert len(dataset.split("train")) == 900 and len(dataset.split("val")) == 100
    assert dataset.tokenizer.vocab_size == 26
    with pytest.raises(GptlabError, match="unknown split"):
        dataset.split("test")


def test_get_batch_shapes_shift_and_determinism(dataset):
    x, y = dataset.get_batch("train", 4, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = dataset.get_batch("train", 4, 8, np.random.default_rng(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_get_batch_uses_the_given_offsets(dataset):
    offsets = np.random.default_rng(7).integers(0, 100 - 16, size=3)
    x, y = dataset.get_batch("val", 3, 16, np.random.default_rng(7))
    val = np.asarray(dataset.split("val"), dtype=np.int64)
    assert np.array_equal(x.numpy(), np.stack([val[o : o + 16] for o in offsets]))
    assert np.array_equal(y.numpy(), np.stack([val[o + 1 : o + 17] for o in offsets]))


def test_get_batch_whole_split_window(dataset):
    x, y = dataset.get_batch("val", 2, 99, np.random.default_rng(0))
    assert x.shape == (2, 99)


def test_get_batch_too_short(dataset):
    with pytest.raises(GptlabError, match=r"validation split has 100 tokens.*block_size\+1 = 101.*--block-size"):
        dataset.get_batch("val", 2, 100, np.random.default_rng(0))


@pytest.mark.parametrize(("block_size", "batch_size"), [(8, 3), (99, 1), (10, 4), (33, 2), (200, 5)])
def test_iter_windows_covers_every_token_once(dataset, block_size, batch_size):
    val = np.asarray(dataset.split("val"), dtype=np.int64)
    batches = list(dataset.iter_windows("val", block_size, batch_size))
    assert all(x.shape == y.shape and x.shape[0] <= batch_size for x, y in batches)
    assert all(x.shape[1] <= block_size for x, _ in batches)
    xs = np.concatenate([x.reshape(-1).numpy() for x, _ in batches])
    ys = np.concatenate([y.reshape(-1).numpy() for _, y in batches])
    assert np.array_equal(xs, val[:-1])
    assert np.array_equal(ys, val[1:])


def test_iter_windows_needs_two_tokens(corpus, tmp_path):
    prepare([str(corpus / "a.txt")], "char", tmp_path / "data", val_fraction=0.0)
    with pytest.raises(GptlabError, match="validation split has 0 tokens"):
        next(TokenDataset(tmp_path / "data").iter_windows("val", 8, 2))


def test_dataset_errors(dataset, tmp_path):
    with pytest.raises(GptlabError, match="does not exist"):
        TokenDataset(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(GptlabError, match="not a prepared data directory.*gptlab prepare"):
        TokenDataset(tmp_path / "plain")
    (dataset.data_dir / "val.bin").unlink()
    with pytest.raises(GptlabError, match="val.bin is missing"):
        TokenDataset(dataset.data_dir)


def test_dataset_detects_truncated_bin(dataset):
    train_bin = dataset.data_dir / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    with pytest.raises(GptlabError, match="does not match meta.json"):
        TokenDataset(dataset.data_dir)


def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) == 42
    assert all(f.is_file() and f.name.endswith("_gut.txt") for f in files)
    assert files == sorted(files)
