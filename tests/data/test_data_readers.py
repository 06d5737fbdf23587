"""Every input format prepare reads: records, compression, Hugging Face datasets, binary files, and the
cut points that let a long document be tokenised in pieces."""

import bz2
import gzip
import io
import json
import lzma

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import one_line_error
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.data import TokenDataset, prepare
from gptlab.data import readers
from gptlab.data.readers import cut_pieces
from gptlab.errors import GptlabError
from gptlab.tokenizers import GPT2Tokenizer

DOCS = ["First Citizen:\nBefore we proceed, hear me.", 'All:\n"Speak, speak."\n\nÜnïcödé 🙂',
        "Second Citizen:\tOne word,\r\nin two lines."]
EOT = 50256


def tokens_of(out):
    """The train split of a dataset prepared with no validation split: the whole corpus, in order."""
    return np.asarray(TokenDataset(out).split("train")).tolist()


def expected_gpt2(docs):
    tok, ids = GPT2Tokenizer(), []
    for i, doc in enumerate(docs):
        ids += ([EOT] if i else []) + tok.encode(doc)
    return ids


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson"])
def test_json_lines_one_document_per_record(tmp_path, suffix):
    records = [{"text": DOCS[0], "id": 1}, {"id": 2}, {"text": None}, {"text": ""},
               {"text": DOCS[1], "meta": {"nested": [1, 2]}}, {"text": DOCS[2]}]
    source = write_jsonl(tmp_path / f"corpus{suffix}", records)
    meta = prepare([str(source)], "gpt2", tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == expected_gpt2(DOCS)  # records without text are left out
    assert meta["documents"] == {"train": 3, "val": 0} and meta["sources"][0]["format"] == "json"


def test_a_json_array_of_objects(tmp_path):
    (tmp_path / "corpus.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    prepare([str(tmp_path / "corpus.json")], "gpt2", tmp_path / "out", text_field="body", val_fraction=0)
    assert tokens_of(tmp_path / "out") == expected_gpt2(DOCS)


def test_text_field_chooses_the_field_and_a_missing_one_is_named(tmp_path, gptlab):
    source = write_jsonl(tmp_path / "c.jsonl", [{"body": d, "title": "t"} for d in DOCS])
    code, _, err = gptlab("prepare", str(source), "--out", str(tmp_path / "out"))
    one_line_error(code, err, 2, "none of the 3 records", "'text'", "--text-field")
    assert not (tmp_path / "out").exists()
    code, out, _ = gptlab("prepare", str(source), "--out", str(tmp_path / "out"), "--text-field", "body",
                          "--tokenizer", "gpt2")
    assert code == 0 and "validation: 1 of 3 documents" in out
    prepare([str(source)], "gpt2", tmp_path / "all", text_field="body", val_fraction=0)
    assert tokens_of(tmp_path / "all") == expected_gpt2(DOCS)


@pytest.mark.parametrize(("content", "fragment"), [
    (b'{"text": "a"}\nnot json\n', "not valid JSON lines"),
    (b'{"text": 5}\n', "not valid JSON lines"),
    (b'{"text": "a"}\n' * 40000 + b'{"text": "b"\n', "in record 40001"),  # a bad record past the first block
    (b"[1, 2]", "must hold objects"),
])
def test_bad_json_is_one_line(tmp_path, gptlab, content, fragment):
    (tmp_path / "bad.jsonl").write_bytes(content)
    code, _, err = gptlab("prepare", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out"))
    one_line_error(code, err, 2, "bad.jsonl", fragment)
    assert not (tmp_path / "out").exists()


def test_csv_and_tsv_with_quotes_commas_and_newlines_in_values(tmp_path):
    rows = "".join(f'{i},"{d.replace(chr(34), chr(34) * 2)}"\n' for i, d in enumerate(DOCS))
    (tmp_path / "c.csv").write_text("id,text\n" + rows, encoding="utf-8")
    prepare([str(tmp_path / "c.csv")], "gpt2", tmp_path / "csv", val_fraction=0)
    assert tokens_of(tmp_path / "csv") == expected_gpt2(DOCS)
    tsv = "".join(f'{i}\t"{d.replace(chr(34), chr(34) * 2)}"\n' for i, d in enumerate(DOCS))
    (tmp_path / "c.tsv").write_text("id\tbody\n" + tsv, encoding="utf-8")
    prepare([str(tmp_path / "c.tsv")], "gpt2", tmp_path / "tsv", text_field="body", val_fraction=0)
    assert tokens_of(tmp_path / "tsv") == expected_gpt2(DOCS)


class CountingReads(io.BytesIO):
    """A file that counts the bytes its readers have taken from it."""

    taken = 0

    def read(self, size=-1):
        data = super().read(size)
        self.taken += len(data)
        return data

    def read1(self, size=-1):  # what io.TextIOWrapper reads through
        data = super().read1(size)
        self.taken += len(data)
        return data


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_records_are_read_as_they_are_needed_not_ahead(tmp_path, monkeypatch, fmt):
    """Memory must not grow with the corpus: by the first batch of documents, a reader has taken about
    one block of the file (here 1 MB), not the 32 blocks pyarrow's streaming readers take ahead."""
    text = "word " * 200  # 1 kB documents, 20 MB in all
    if fmt == "json":
        data = "".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(20000)).encode()
    else:
        data = ("id,text\n" + "".join(f'{i},"{i} {text}"\n' for i in range(20000))).encode()
    monkeypatch.setattr(readers, "RECORD_BLOCK_BYTES", 2**20)
    opened: list[CountingReads] = []
    monkeypatch.setattr(readers, "open", lambda *a, **k: opened.append(CountingReads(data)) or opened[-1],
                        raising=False)
    path = tmp_path / f"c.{fmt}"
    pieces = readers.read(readers.FileSource(path, fmt, None, len(data)), "text")
    first = next(pieces)
    assert first.text.startswith("0 word") and first.first
    assert opened[-1].taken <= 2 * 2**20, opened[-1].taken  # about one block, not 20 MB
    assert sum(p.first for p in pieces) == 19999 and opened[-1].taken == len(data)


def test_line_blocks_hold_whole_lines_however_long():
    lines = [b'{"a": 1}', b'{"b": "' + b"x" * 50 + b'"}', b"", b"", b"", b"", b'{"c": 3}']
    blocks = list(readers._line_blocks(io.BytesIO(b"\n".join(lines)), size=8))
    assert [line for b in blocks for line in b.split(b"\n") if line] == [line for line in lines if line]
    assert all(b.endswith(b"\n") for b in blocks[:-1]) and blocks[-1] == b'{"c": 3}'
    assert all(b.strip() for b in blocks) and len(blocks) == 3  # the blank lines' own block is left out


@pytest.mark.parametrize(("content", "fragment"), [
    (b"id,text\n1,hello\n2,a,b\n", "line 3: 3 fields where the header has 2"),
    (b'id,text\n1,"never closed\n', "not valid CSV"),
    (b"id,text\n1,caf\xe9\n", "not UTF-8"),
])
def test_bad_csv_is_one_line(tmp_path, gptlab, content, fragment):
    (tmp_path / "bad.csv").write_bytes(content)
    code, _, err = gptlab("prepare", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "out"))
    one_line_error(code, err, 2, "bad.csv", fragment)
    assert not (tmp_path / "out").exists()


def test_a_csv_value_longer_than_the_csv_modules_default_limit(tmp_path):
    long = "To be, or not to be. " * 20000  # 420 kB in one field; the csv module's default limit is 128 KiB
    (tmp_path / "c.csv").write_text(f'id,text\n1,"{long}"\n', encoding="utf-8")
    prepare([str(tmp_path / "c.csv")], "gpt2", tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == GPT2Tokenizer().encode(long)


def test_csv_without_the_column_lists_its_columns(tmp_path):
    (tmp_path / "c.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(GptlabError, match=r"no column 'text' \(its columns: id, body\).*--text-field"):
        prepare([str(tmp_path / "c.csv")], "char", tmp_path / "out")


def test_parquet_over_several_row_groups(tmp_path):
    docs = DOCS * 5
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=4)
    assert pq.ParquetFile(tmp_path / "c.parquet").num_row_groups == 4
    prepare([str(tmp_path / "c.parquet")], "gpt2", tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == expected_gpt2(docs)


def test_parquet_column_missing_or_not_text(tmp_path):
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(GptlabError, match=r"no column 'text' \(its columns: n\)"):
        prepare([str(tmp_path / "c.parquet")], "char", tmp_path / "out")
    with pytest.raises(GptlabError, match="'n' holds int64, not text"):
        prepare([str(tmp_path / "c.parquet")], "char", tmp_path / "out", text_field="n")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(GptlabError, match="fake.parquet: not valid Parquet"):
        prepare([str(tmp_path / "fake.parquet")], "char", tmp_path / "out")


COMPRESSORS = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
               ".zst": lambda data: pa.compress(data, "zstd", asbytes=True)}


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_compressed_files_read_as_their_contents(tmp_path, suffix):
    text = "\n".join(DOCS) * 50
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text(text, encoding="utf-8")
    write_jsonl(tmp_path / "plain" / "b.jsonl", [{"text": d} for d in DOCS])
    (tmp_path / "packed").mkdir()
    for name in ("a.txt", "b.jsonl"):
        (tmp_path / "packed" / (name + suffix)).write_bytes(COMPRESSORS[suffix]((tmp_path / "plain" / name).read_bytes()))
    plain = prepare([str(tmp_path / "plain")], "gpt2", tmp_path / "p", val_fraction=0)
    packed = prepare([str(tmp_path / "packed")], "gpt2", tmp_path / "q", val_fraction=0)
    assert tokens_of(tmp_path / "p") == tokens_of(tmp_path / "q")
    assert plain["documents"] == packed["documents"]
    name = COMPRESSION_NAMES[suffix]
    assert [s["format"] for s in packed["sources"]] == [f"text+{name}", f"json+{name}"]


COMPRESSION_NAMES = {".gz": "gzip", ".xz": "xz", ".bz2": "bz2", ".zst": "zstd"}


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_a_damaged_compressed_file_is_one_line(tmp_path, gptlab, suffix):
    packed = COMPRESSORS[suffix](b"some text " * 1000)
    (tmp_path / f"bad.txt{suffix}").write_bytes(packed[: len(packed) // 2])
    code, _, err = gptlab("prepare", str(tmp_path / f"bad.txt{suffix}"), "--out", str(tmp_path / "out"))
    one_line_error(code, err, 2, f"bad.txt{suffix}", f"cannot read it as a {COMPRESSION_NAMES[suffix]} file")
    assert not (tmp_path / "out").exists()


def test_skip_binary_skips_and_counts_files_that_are_not_text(tmp_path, gptlab):
    corpus = tmp_path / "tree"
    (corpus / "__pycache__").mkdir(parents=True)
    (corpus / "a.py").write_text("print('hello')\n")
    (corpus / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00compiled")
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (corpus / "notes.txt.gz").write_bytes(gzip.compress("notes\n".encode()))
    code, _, err = gptlab("prepare", str(corpus), "--out", str(tmp_path / "out"))
    one_line_error(code, err, 2, "a.cpython-311.pyc", "NUL bytes", "--skip-binary")
    code, out, _ = gptlab("prepare", str(corpus), "--out", str(tmp_path / "out"), "--skip-binary")
    assert code == 0 and "skipped 2 files that are not text" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in meta["skipped"]] == ["a.cpython-311.pyc", "logo.png"]
    assert [s["path"].rsplit("/", 1)[-1] for s in meta["sources"]] == ["a.py", "notes.txt.gz"]
    dataset = TokenDataset(tmp_path / "out")  # two documents: the first for training, the second for validation
    tokens = [*dataset.split("train"), *dataset.split("val")]
    assert dataset.tokenizer.decode(tokens) == "print('hello')\n\n\nnotes\n"


def test_text_that_turns_binary_after_its_start_is_an_error_even_when_skipping(tmp_path, monkeypatch):
    monkeypatch.setattr("gptlab.data.readers.BLOCK_BYTES", 64)
    monkeypatch.setattr("gptlab.data.readers.PIECE_CHARS", 50)
    (tmp_path / "late.txt").write_bytes(b"plain words " * 20 + b"\xff\xfe")
    with pytest.raises(GptlabError, match=r"late.txt is not UTF-8 text \(invalid byte at offset 240\), after its start"):
        prepare([str(tmp_path / "late.txt")], "char", tmp_path / "out", skip_binary=True)


@pytest.fixture(scope="module")
def hf_datasets():
    return pytest.importorskip("datasets", reason="the Hugging Face tests need the datasets extra (make test has it)")


def test_hf_dataset_saved_to_disk(tmp_path, hf_datasets, gptlab):
    ds = hf_datasets.Dataset.from_dict({"text": DOCS + [None], "n": [1, 2, 3, 4]})
    hf_datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    code, out, _ = gptlab("prepare", "--hf-dataset", str(tmp_path / "saved"), "--tokenizer", "gpt2",
                          "--out", str(tmp_path / "cli"), "--no-progress")
    assert code == 0 and "validation: 1 of 3 documents" in out, out
    prepare([], "gpt2", tmp_path / "out", hf_dataset=str(tmp_path / "saved"), val_fraction=0)
    assert tokens_of(tmp_path / "out") == expected_gpt2(DOCS)
    source = json.loads((tmp_path / "out" / "meta.json").read_text())["sources"][0]
    assert (source["hf_dataset"], source["split"], source["rows"]) == (str(tmp_path / "saved"), "train", 4)
    assert source["fingerprint"]
    code, _, err = gptlab("prepare", "--hf-dataset", str(tmp_path / "saved"), "--split", "validation",
                          "--out", str(tmp_path / "other"))
    one_line_error(code, err, 2, "no split 'validation'", "train, test")
    ds.save_to_disk(str(tmp_path / "one"))
    prepare([], "gpt2", tmp_path / "one-out", hf_dataset=str(tmp_path / "one"), val_fraction=0)
    assert tokens_of(tmp_path / "one-out") == expected_gpt2(DOCS)


def test_hf_dataset_from_local_data_files_offline(tmp_path, hf_datasets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "part-0.jsonl", [{"text": d} for d in DOCS[:2]])
    write_jsonl(tmp_path / "files" / "part-1.jsonl", [{"text": DOCS[2]}])
    prepare([], "gpt2", tmp_path / "out", hf_dataset=str(tmp_path / "files"), val_fraction=0)
    assert tokens_of(tmp_path / "out") == expected_gpt2(DOCS)
    with pytest.raises(GptlabError, match="no column 'body'"):
        prepare([], "gpt2", tmp_path / "out2", hf_dataset=str(tmp_path / "files"), text_field="body")
    with pytest.raises(GptlabError, match="nothing-here: no such directory or file"):
        prepare([], "gpt2", tmp_path / "out2", hf_dataset=str(tmp_path / "nothing-here"))
    assert not (tmp_path / "out2").exists()


def test_hf_dataset_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(GptlabError, match=r"pip install 'gptlab\[datasets\]'"):
        prepare([], "gpt2", tmp_path / "out", hf_dataset="anything")


TEXT = st.lists(st.sampled_from(list("ab Z9.,'\n\t\r\u00a0\u3000é🙂\x1c") + ["  ", "\n\n", "'s", "'ll", " the"]),
                min_size=1, max_size=200).map("".join)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(text=TEXT, data=st.data())
def test_pieces_tokenise_exactly_as_the_whole_text(text, data):
    """The pieces join back to the text, and GPT-2 (the pre-tokenizer included) gives the same ids. (Text
    with no cut point for 8 x limit characters is cut where it stands: the limit keeps that out here.)"""
    limit = data.draw(st.integers(max(1, -(-len(text) // 8)), max(1, len(text))))
    pieces, rest = cut_pieces(text, final=True, limit=limit)
    assert rest == "" and "".join(pieces) == text
    tok = GPT2Tokenizer()
    assert [i for piece in pieces for i in tok.encode(piece)] == tok.encode(text)
    partial, rest = cut_pieces(text, final=False, limit=limit)
    assert "".join(partial) + rest == text


def test_text_without_a_cut_point_is_cut_at_eight_times_the_limit():
    text = "x" * 100 + " tail"
    pieces, rest = cut_pieces(text, final=True, limit=10)
    assert [len(p) for p in pieces] == [80, 20, 5] and "".join(pieces) == text  # then the space is a cut point
    assert cut_pieces("x" * 50, final=False, limit=10) == ([], "x" * 50)  # a space may still come


def test_long_documents_are_cut_into_bounded_pieces():
    text = ("word " * 100 + "\n") * 100
    pieces, rest = cut_pieces(text, final=False, limit=1000)
    assert len(pieces) > 40 and all(len(p) <= 1000 for p in pieces) and len(rest) <= 1000
    for before, after in zip(pieces, [*pieces[1:], rest]):  # each cut just before a space after a word
        assert not before[-1].isspace() and after[0] in " \n"
