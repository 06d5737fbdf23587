"""prepare's token streams and splits, and TokenDataset's reads over one shard or many."""

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import SHAKESPEARE, needs_shakespeare

from gptlab.data import TokenDataset, default_corpus_files, prepare, resolve_inputs
from gptlab.data import readers
from gptlab.errors import GptlabError
from gptlab.tokenizers import TOKENIZER_FILE, CharTokenizer, GPT2Tokenizer

TEXT_A = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
TEXT_B = "All:\nSpeak, speak. Ünïcödé too 🙂\n"
EOT = 50256


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (src / "sub" / "b.txt").write_text(TEXT_B, encoding="utf-8")
    return src


def read_split(out, name):
    """A split's tokens straight from its shard files, as meta.json lists them."""
    meta = json.loads((out / "meta.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["shards"][name]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def documents(count, seed=0):
    """`count` distinct documents of varied length, some with blank lines of their own."""
    rng = np.random.default_rng(seed)
    words = ["the", "king", "speak", "hear", "me", "Citizen", "proceed", "further", "lord", "night"]
    return [f"Document {i}.\n" + " ".join(rng.choice(words, size=int(rng.integers(5, 120)))) + "\n\nEnd.\n"
            for i in range(count)]


def test_prepare_char_single_file_round_trip(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus / "a.txt")], "char", out)
    tok = CharTokenizer.from_text(TEXT_A)
    train, val = read_split(out, "train"), read_split(out, "val")
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == TEXT_A
    assert meta == json.loads((out / "meta.json").read_text())
    assert (meta["format"], meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gptlab-dataset", "char",
                                                                                      tok.vocab_size, "uint16")
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert (meta["val_fraction"], meta["val_split"], meta["documents"]) == (0.1, "tail", {"train": 1, "val": 0})
    raw = (corpus / "a.txt").read_bytes()
    assert meta["sources"] == [
        {"path": str((corpus / "a.txt").resolve()), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    ]
    assert json.loads((out / TOKENIZER_FILE).read_text())["type"] == "char"
    assert sorted(meta["files"]) == ["gptlab_tokenizer.json", "tokenizer.json", "tokenizer_config.json",
                                     "train-000000.bin", "val-000000.bin"]  # the middle two for transformers
    assert sorted(p.name for p in out.iterdir()) == sorted([".gptlab-prepare.lock", *meta["files"], "meta.json"])


def test_a_single_document_keeps_its_last_fraction_for_validation(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus / "a.txt")], "char", out, val_fraction=0.25)
    ids = CharTokenizer.from_text(TEXT_A).encode(TEXT_A)
    n_train = int(len(ids) * 0.75)
    assert meta["train_tokens"] == n_train
    assert read_split(out, "train").tolist() == ids[:n_train]
    assert read_split(out, "val").tolist() == ids[n_train:]


@needs_shakespeare()
def test_tiny_shakespeare_split_is_the_benchmark_convention_bit_for_bit(tmp_path):
    """../shared/data/README.md: vocabulary of the whole file, first 90% of characters train, last 10% val."""
    meta = prepare([str(SHAKESPEARE)], "char", tmp_path / "data", val_fraction=0.1)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    assert np.array_equal(read_split(tmp_path / "data", "train"), ids[:1_003_854])
    assert np.array_equal(read_split(tmp_path / "data", "val"), ids[1_003_854:])
    assert TokenDataset(tmp_path / "data").tokenizer.chars == chars


@needs_shakespeare()
def test_gpt2_over_workers_shards_and_pieces_gives_the_whole_files_tokens(tmp_path, monkeypatch):
    """Cut into 20k-character pieces, tokenised by two processes, written to 30k-token shards, the tail
    moved across shard boundaries: the same ids as encoding the whole file at once."""
    monkeypatch.setattr(readers, "PIECE_CHARS", 20_000)
    monkeypatch.setattr(readers, "BLOCK_BYTES", 50_000)
    meta = prepare([str(SHAKESPEARE)], "gpt2", tmp_path / "data", workers=2, shard_tokens=30_000)
    ids = GPT2Tokenizer().encode(SHAKESPEARE.read_text(encoding="utf-8"))
    n_train = int(len(ids) * 0.9)
    assert len(meta["shards"]["train"]) == -(-n_train // 30_000) and len(meta["shards"]["val"]) == 2
    assert read_split(tmp_path / "data", "train").tolist() == ids[:n_train]
    assert read_split(tmp_path / "data", "val").tolist() == ids[n_train:]


def test_zero_val_fraction(corpus, tmp_path):
    meta = prepare([str(corpus)], "char", tmp_path / "out", val_fraction=0.0)
    assert (meta["val_tokens"], meta["val_split"], meta["shards"]["val"]) == (0, "none", [])
    assert len(TokenDataset(tmp_path / "out").split("val")) == 0


def test_two_documents_give_validation_the_second_whole(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus)], "char", out)
    tok = TokenDataset(out).tokenizer
    assert tok.chars == sorted(set(TEXT_A + TEXT_B + "\n\n"))
    assert tok.decode(read_split(out, "train").tolist()) == TEXT_A
    assert tok.decode(read_split(out, "val").tolist()) == "\n\n" + TEXT_B
    assert (meta["val_split"], meta["documents"]) == ("documents", {"train": 1, "val": 1})
    assert [s["path"] for s in meta["sources"]] == [str((corpus / "a.txt").resolve()),
                                                   str((corpus / "sub" / "b.txt").resolve())]


def test_gpt2_separates_documents_with_eos(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare([str(corpus)], "gpt2", out)
    tok = GPT2Tokenizer()
    assert read_split(out, "train").tolist() == tok.encode(TEXT_A)
    assert read_split(out, "val").tolist() == [EOT] + tok.encode(TEXT_B)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file() and name in meta["files"]
    assert isinstance(TokenDataset(out).tokenizer, GPT2Tokenizer)


def test_validation_is_a_deterministic_set_of_whole_documents(tmp_path):
    docs = documents(60)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    metas = [prepare([str(tmp_path / "corpus.jsonl")], "gpt2", tmp_path / name, val_fraction=0.2)
             for name in ("a", "b")]
    assert metas[0]["shards"] == metas[1]["shards"]
    tok = GPT2Tokenizer()
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "a", split), read_split(tmp_path / "b", split))
    val = tok.decode(read_split(tmp_path / "a", "val").tolist()).split("<|endoftext|>")
    train = tok.decode(read_split(tmp_path / "a", "train").tolist()).split("<|endoftext|>")
    assert val[0] == "" and set(val[1:]) <= set(docs)  # every validation document whole, each after an EOT
    assert sorted(train + val[1:]) == sorted(docs)  # and every document in exactly one split
    assert metas[0]["documents"] == {"train": len(train), "val": len(val) - 1}
    share = metas[0]["val_tokens"] / (metas[0]["val_tokens"] + metas[0]["train_tokens"])
    longest = max(len(tok.encode(d)) + 1 for d in docs) / (metas[0]["val_tokens"] + metas[0]["train_tokens"])
    assert abs(share - 0.2) <= longest  # within one document of the asked share
    assert docs[1] in val  # the second document always starts validation
    positions = sorted(docs.index(d) for d in val[1:])
    assert positions[-1] > 40  # spread through the corpus, not all at its start


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_worker_processes_write_what_one_process_writes(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("gptlab.data.pipeline._BATCH_CHARS", 500)  # many batches in flight
    for i, doc in enumerate(documents(30, seed=1)):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(doc)
    one = prepare([str(tmp_path / "corpus")], tokenizer, tmp_path / "one", workers=1)
    two = prepare([str(tmp_path / "corpus")], tokenizer, tmp_path / "two", workers=2, shard_tokens=997)
    assert (one["train_tokens"], one["val_tokens"], one["documents"]) == (two["train_tokens"], two["val_tokens"],
                                                                          two["documents"])
    assert one["sources"] == two["sources"] and len(two["shards"]["train"]) > 1
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "one", split), read_split(tmp_path / "two", split))
    assert (tmp_path / "one" / TOKENIZER_FILE).read_bytes() == (tmp_path / "two" / TOKENIZER_FILE).read_bytes()


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
        ("caf\u00e9 latin-1".encode("latin-1"), "not UTF-8.*offset 3"),
    ],
)
def test_prepare_bad_files(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(GptlabError, match=message) as info:
        prepare([str(bad)], "char", tmp_path / "out")
    if "empty" not in message:
        assert "bad.txt" in str(info.value) and "--skip-binary" in str(info.value)
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


@pytest.fixture
def sharded(tmp_path):
    """The `dataset` fixture's corpus written as 64-token shards."""
    src = tmp_path / "text.txt"
    src.write_text("".join(chr(ord("a") + i % 26) for i in range(1000)), encoding="utf-8")
    prepare([str(src)], "char", tmp_path / "sharded", shard_tokens=64)
    return TokenDataset(tmp_path / "sharded")


def test_dataset_splits(dataset):
    assert not np.asarray(dataset.split("train")).flags.owndata  # one shard: a view of its memmap, no copy
    assert len(dataset.split("train")) == 900 and len(dataset.split("val")) == 100
    assert dataset.tokenizer.vocab_size == 26
    with pytest.raises(GptlabError, match="unknown split"):
        dataset.split("test")


def test_many_shards_read_as_one_array(dataset, sharded):
    assert len(sharded.meta["shards"]["train"]) == 15 and len(sharded.meta["shards"]["val"]) == 2
    for name in ("train", "val"):
        whole, parts = np.asarray(dataset.split(name)), sharded.split(name)
        assert len(parts) == len(whole) and np.array_equal(np.asarray(parts), whole)
        assert np.array_equal(parts[60:130], whole[60:130]) and np.array_equal(parts[-70:], whole[-70:])
        assert parts[64] == whole[64] and parts[-1] == whole[-1]
        positions = np.random.default_rng(0).integers(0, len(whole), size=(7, 9))
        assert np.array_equal(parts[positions], whole[positions])


def test_get_batch_and_iter_windows_do_not_depend_on_sharding(dataset, sharded):
    for split in ("train", "val"):
        a = dataset.get_batch(split, 8, 40, np.random.default_rng(3))
        b = sharded.get_batch(split, 8, 40, np.random.default_rng(3))
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        for (xa, ya), (xb, yb) in zip(dataset.iter_windows(split, 30, 4), sharded.iter_windows(split, 30, 4),
                                      strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


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


@pytest.mark.parametrize("rows", [slice(1, None, 2), slice(0, 3), [5, 0], np.array([7])])
def test_get_batch_rows_are_that_share_of_the_whole_batch(sharded, rows):
    """Each DDP rank draws the same offsets from the same rng state and reads only its rows."""
    whole_rng, part_rng = np.random.default_rng(11), np.random.default_rng(11)
    x, y = sharded.get_batch("train", 8, 16, whole_rng)
    xr, yr = sharded.get_batch("train", 8, 16, part_rng, rows=rows)
    assert torch.equal(xr, x[rows]) and torch.equal(yr, y[rows])
    assert whole_rng.integers(1 << 30) == part_rng.integers(1 << 30)  # both rngs moved on alike


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device, and this machine has none")
def test_get_batch_pinned(dataset):
    x, y = dataset.get_batch("train", 4, 8, np.random.default_rng(0), pin_memory=True)
    x0, y0 = dataset.get_batch("train", 4, 8, np.random.default_rng(0))
    assert x.is_pinned() and y.is_pinned() and torch.equal(x, x0) and torch.equal(y, y0)


def test_get_batch_whole_split_window(dataset):
    x, y = dataset.get_batch("val", 2, 99, np.random.default_rng(0))
    assert x.shape == (2, 99)


def test_get_batch_too_short(dataset):
    with pytest.raises(GptlabError, match=r"validation split of .* has 100 tokens.*block_size\+1 = 101.*--val-fraction.*--block-size"):
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
    (dataset.data_dir / "val-000000.bin").unlink()
    with pytest.raises(GptlabError, match="val-000000.bin is missing"):
        TokenDataset(dataset.data_dir)


def test_dataset_detects_truncated_shard(dataset):
    shard = dataset.data_dir / "train-000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(GptlabError, match="does not match meta.json"):
        TokenDataset(dataset.data_dir)


def test_dataset_from_an_older_gptlab_is_named(tmp_path):
    (tmp_path / "old").mkdir()
    meta = {"tokenizer": "char", "vocab_size": 2, "dtype": "uint16", "train_tokens": 1, "val_tokens": 1,
            "sources": []}
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GptlabError, match="older gptlab.*--overwrite"):
        TokenDataset(tmp_path / "old")


def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) == 42
    assert all(f.is_file() and f.name.endswith("_gut.txt") for f in files)
    assert files == sorted(files)
