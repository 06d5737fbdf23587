"""`gptlab tokenizer train` end to end: inputs as prepare reads them, then prepare, train, sample, eval and
export with the trained tokenizer; and bad input as one line with exit 2."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from helpers import TINY_ARGS, TINY_TEXT, one_line_error
from gptlab.tokenizers import BPETokenizer, load_tokenizer

DOCS = [TINY_TEXT[:2000], "def f(x):\n    return [x ** 2 for _ in range(3)]\n" * 20, "Ελληνικά και 日本語 🙂 " * 30]
FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "gptlab_tokenizer.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok-corpus")
    for i, doc in enumerate(DOCS):
        (root / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return root


def test_train_writes_one_format(gptlab, corpus, tmp_path):
    code, out, err = gptlab("tokenizer", "train", str(corpus), "--vocab-size", "380", "--out", str(tmp_path / "t"),
                            "--special", "<|pad|>", "--special", "<|user|>")
    assert code == 0, err
    assert "380 tokens" in out
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(FILES)
    tok = load_tokenizer(tmp_path / "t")
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 380
    assert tok.special_tokens == ["<|endoftext|>", "<|pad|>", "<|user|>"]
    assert json.loads((tmp_path / "t" / "vocab.json").read_text(encoding="utf-8"))["<|user|>"] == 379


def test_training_is_deterministic(gptlab, corpus, tmp_path):
    for name in ("a", "b"):
        assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "350", "--out", str(tmp_path / name))[0] == 0
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_record_formats_train_the_same_tokenizer(gptlab, corpus, tmp_path):
    """The same documents as JSON lines (gzipped) give the same merges as one text file per document."""
    records = tmp_path / "docs.jsonl.gz"
    with gzip.open(records, "wt", encoding="utf-8") as handle:
        for doc in DOCS:
            handle.write(json.dumps({"text": doc}) + "\n")
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "350", "--out", str(tmp_path / "a"))[0] == 0
    assert gptlab("tokenizer", "train", str(records), "--vocab-size", "350", "--out", str(tmp_path / "b"))[0] == 0
    assert (tmp_path / "a" / "merges.txt").read_bytes() == (tmp_path / "b" / "merges.txt").read_bytes()


def test_prepare_train_sample_eval_export(gptlab, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok_dir, data, run, export = (tmp_path / name for name in ("tok", "data", "run", "export"))
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "360", "--out", str(tok_dir))[0] == 0
    code, out, err = gptlab("prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data))
    assert code == 0, err
    assert "bpe tokenizer, vocabulary 360" in out
    tok = load_tokenizer(tok_dir)
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"]) == ("bpe", 360)
    tokens = sum(len(tok.encode(doc)) for doc in DOCS) + len(DOCS) - 1  # one <|endoftext|> between documents
    assert meta["train_tokens"] + meta["val_tokens"] == tokens
    code, out, err = gptlab("train", "--data", str(data), "--out", str(run), *TINY_ARGS, "--max-iters", "4",
                            "--no-progress")
    assert code == 0, err
    assert load_tokenizer(run).fingerprint() == tok.fingerprint()
    code, out, err = gptlab("sample", str(run), "--prompt", "def f", "--max-new-tokens", "8", "--seed", "1")
    assert code == 0 and out.startswith("def f"), err
    code, out, err = gptlab("eval", str(run), "--data", str(data), "--json")
    assert code == 0, err
    scored = json.loads(out)["model"]
    assert scored["tokens"] == meta["val_tokens"] - 1 and scored["bits_per_byte"] > 0, scored
    assert gptlab("export", str(run), str(export))[0] == 0
    hf = AutoTokenizer.from_pretrained(export)
    for text in [*DOCS, "new text: ünïcödé 🙂\t\t  end"]:
        assert hf.encode(text) == tok.encode(text)
    assert load_tokenizer(export).fingerprint() == tok.fingerprint()


@pytest.mark.parametrize("size", ["256", "1"])
def test_vocabulary_too_small(gptlab, corpus, tmp_path, size):
    code, _, err = gptlab("tokenizer", "train", str(corpus), "--vocab-size", size, "--out", str(tmp_path / "t"))
    one_line_error(code, err, 2, "too small", "257")
    assert not (tmp_path / "t").exists()


def test_a_corpus_with_fewer_pairs_than_asked(gptlab, corpus, tmp_path):
    code, out, err = gptlab("tokenizer", "train", str(corpus), "--vocab-size", "5000", "--out", str(tmp_path / "t"))
    assert code == 0, err
    size = load_tokenizer(tmp_path / "t").vocab_size
    assert size < 5000 and f"{size:,} tokens" in out and "no more pairs" in out


def test_vocabulary_too_small_for_the_special_tokens(gptlab, corpus, tmp_path):
    code, _, err = gptlab("tokenizer", "train", str(corpus), "--vocab-size", "257", "--special", "<|pad|>",
                          "--out", str(tmp_path / "t"))
    one_line_error(code, err, 2, "258")


def test_empty_corpus(gptlab, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    code, _, err = gptlab("tokenizer", "train", str(tmp_path / "empty.txt"), "--vocab-size", "300",
                          "--out", str(tmp_path / "t"))
    one_line_error(code, err, 2, "empty")
    assert not (tmp_path / "t").exists()


def test_out_holding_other_files_or_a_tokenizer(gptlab, corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = gptlab("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "mine"))
    one_line_error(code, err, 2, "notes.txt")
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t"))[0] == 0
    code, _, err = gptlab("tokenizer", "train", str(corpus), "--vocab-size", "310", "--out", str(tmp_path / "t"))
    one_line_error(code, err, 2, "--overwrite")
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "310", "--out", str(tmp_path / "t"),
                  "--overwrite")[0] == 0
    assert load_tokenizer(tmp_path / "t").vocab_size == 310


def test_prepare_with_a_directory_that_is_not_a_tokenizer(gptlab, corpus, tmp_path):
    (tmp_path / "nothing").mkdir()
    code, _, err = gptlab("prepare", str(corpus), "--tokenizer", str(tmp_path / "nothing"), "--out", str(tmp_path / "d"))
    one_line_error(code, err, 2, "holds no tokenizer")
    code, _, err = gptlab("prepare", str(corpus), "--tokenizer", str(tmp_path / "absent"), "--out", str(tmp_path / "d"))
    one_line_error(code, err, 2, "unknown tokenizer")
    assert not (tmp_path / "d").exists()


def test_damaged_tokenizer_directory(gptlab, corpus, tmp_path):
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t"))[0] == 0
    (tmp_path / "t" / "merges.txt").write_text("#version: 0.2\nnot a merge line\n")
    code, _, err = gptlab("prepare", str(corpus), "--tokenizer", str(tmp_path / "t"), "--out", str(tmp_path / "d"))
    one_line_error(code, err, 2, "merges.txt")


def test_model_whose_vocabulary_disagrees_with_the_tokenizer(gptlab, corpus, tmp_path):
    """A run's tokenizer replaced by a larger one: sampling refuses it rather than decode wrong ids."""
    run, data = tmp_path / "run", tmp_path / "data"
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "small"))[0] == 0
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "370", "--out", str(tmp_path / "big"))[0] == 0
    assert gptlab("prepare", str(corpus), "--tokenizer", str(tmp_path / "small"), "--out", str(data))[0] == 0
    assert gptlab("train", "--data", str(data), "--out", str(run), *TINY_ARGS, "--max-iters", "2",
                  "--no-progress")[0] == 0
    load_tokenizer(tmp_path / "big").save(run)
    code, _, err = gptlab("sample", str(run), "--max-new-tokens", "4")
    one_line_error(code, err, 2, "370 tokens", "300")


def test_input_that_is_not_text(gptlab, corpus, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"abc\x00def")
    code, _, err = gptlab("tokenizer", "train", str(corpus), str(tmp_path / "blob.bin"), "--vocab-size", "300",
                          "--out", str(tmp_path / "t"))
    one_line_error(code, err, 2, "blob.bin", "--skip-binary")
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_serve_and_the_lm_eval_model_take_a_trained_tokenizer(gptlab, corpus, tmp_path):
    """The server and lm-eval's model read a run's own BPE: the server's echoed prompt tokens and the
    lm-eval model's token ids are the trained tokenizer's, and its scores equal gptlab's scorer."""
    import httpx
    import torch

    from gptlab.evaluate import token_nll
    from gptlab.evaluate.harness import GptlabLM
    from gptlab.inference.loading import load_pretrained
    from gptlab.serve import create_app, running_server

    tok_dir, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert gptlab("tokenizer", "train", str(corpus), "--vocab-size", "360", "--out", str(tok_dir))[0] == 0
    assert gptlab("prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data))[0] == 0
    code, _, err = gptlab("train", "--data", str(data), "--out", str(run), *TINY_ARGS, "--max-iters", "4",
                          "--no-progress")
    assert code == 0, err
    tok = load_tokenizer(tok_dir)
    model, run_tok = load_pretrained(run, torch.device("cpu"))
    prompt = "def f(x): return 日本語 🙂"
    ids = tok.encode(prompt)
    assert len(ids) < len(prompt.encode())  # merges apply: fewer tokens than bytes
    with running_server(create_app(model, run_tok, "bpe-run")) as url:
        answer = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "bpe-run", "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 0, "temperature": 0})
    assert answer.status_code == 200, answer.text
    echoed = answer.json()["choices"][0]["logprobs"]["tokens"][:len(ids)]
    assert echoed == [tok.decode([i]) for i in ids]
    lm = GptlabLM(pretrained=str(run))
    assert lm.tok_encode(prompt) == ids
    context, continuation = "def f(x):", "\n    return x"
    (logprob, _), = lm.loglikelihood([_Request(context, continuation)], disable_tqdm=True)
    whole = tok.encode(context + continuation)
    start = len(tok.encode(context))  # lm-eval splits the whole text's tokens where the context's end
    x = torch.tensor([whole[:-1]])  # (1, T): the context needs no document start
    y = torch.tensor([[-100] * (start - 1) + whole[start:]])  # (1, T): scored on the continuation only
    with torch.no_grad():
        expected = -token_nll(model, x, y, where=y >= 0).sum().item()
    assert logprob == pytest.approx(expected, abs=1e-4)


class _Request:
    """What lm-eval hands a model: a request whose `args` are its arguments."""

    def __init__(self, *args: str) -> None:
        self.args = args
