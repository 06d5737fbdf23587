"""The textbook BPE (gptlab.bpe) against Hugging Face's trainer and the three encoders of a trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import SHAKESPEARE, TINY_TEXT, needs_shakespeare
from gptlab import bpe
from gptlab.errors import GptlabError
from gptlab.data.tokenizer_training import train_tokenizer
from gptlab.tokenizers import GPT2_EOT, BPETokenizer, load_tokenizer

CODE = '''def mean(values: list[float]) -> float:
    """The arithmetic mean."""
    if not values:
        raise ValueError("no values")
    return sum(values) / len(values)


for i in range(10):
    print(f"{i:>3}: {mean([i, i * 2, 1.5e-3])}")
'''
SCRIPTS = "日本語の文章です。Ελληνικά κείμενα. Русский текст, ещё немного. العربية نص. हिन्दी पाठ।\n"
EMOJI = "emoji 🙂👍🏽🇫🇷 and ZWJ 👩‍👩‍👧 family\n"
CORPUS = [TINY_TEXT[:3000], CODE * 3, SCRIPTS * 4, EMOJI * 4, "tabs\t\tand   spaces  \n\n\r\n  end   \n" * 5]
MIXED = [CODE, SCRIPTS, EMOJI, "   leading and trailing   ", "a\u00a0b\u3000c\u2028d \t\n\n\n  x", "1234567 3.14159 1e-9",
         "I'M sure they'LL say it's done", "x<|endoftext|>y <|pad|> z"]


def test_textbook_example():
    """Wikipedia's example: aaabdaaabac -> aa, then ab (a tie with "aa a", broken by smaller ids), then aa+ab."""
    merges = bpe.train({b"aaabdaaabac": 1}, 10)
    a, b = bpe.BYTE_ID[ord("a")], bpe.BYTE_ID[ord("b")]
    assert merges[:3] == [(a, a), (a, b), (256, 257)]
    assert bpe.token_bytes(merges)[258] == b"aaab"
    assert bpe.encode("aaabdaaabac", merges[:3]) == [258, bpe.BYTE_ID[ord("d")], 258, a, bpe.BYTE_ID[ord("c")]]


def test_byte_order_is_gpt2s():
    vocab = json.loads((Path(bpe.__file__).parent / "assets" / "gpt2_vocab.json").read_text())
    chars = bpe.bytes_to_unicode()
    assert [vocab[chars[b]] for b in bpe.BYTE_ORDER] == list(range(256))


def test_pre_tokenizer_keeps_chunks_apart():
    counts = bpe.chunk_counts(["the dog. the dog!"])
    assert counts == {b"the": 1, b" dog": 2, b".": 1, b" the": 1, b"!": 1}
    assert bpe.chunk_counts(["12345\n\n"], "gpt4") == {b"123": 1, b"45": 1, b"\n\n": 1}


def _hf_merges_as_ids(tokenizer: BPETokenizer) -> list[tuple[int, int]]:
    ids = {char: i for i, char in enumerate(bpe.bytes_to_unicode().values())}
    out = []
    for a, b in tokenizer.merges:
        out.append((ids[a], ids[b]))
        ids[a + b] = len(ids)
    return out


def _write_corpus(directory: Path, texts: list[str]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, text in enumerate(texts):
        (directory / f"doc{i}.txt").write_text(text, encoding="utf-8")
        files.append(str(directory / f"doc{i}.txt"))
    return files


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_hugging_face_trainer_learns_the_textbook_merges(tmp_path, pattern):
    """The command runs HF's trainer; the reference must learn exactly the same merges, in the same order."""
    files = _write_corpus(tmp_path / "corpus", CORPUS)
    trained = train_tokenizer(files, 256 + 300 + 1, tmp_path / "tok", pattern=pattern)
    reference = bpe.train(bpe.chunk_counts(CORPUS, pattern), 300)
    assert len(reference) == 300
    assert _hf_merges_as_ids(trained) == reference


@pytest.mark.slow
@needs_shakespeare()
def test_same_merges_on_shakespeare(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:40_000]
    trained = train_tokenizer(_write_corpus(tmp_path / "c", [text]), 256 + 200 + 1, tmp_path / "tok")
    assert _hf_merges_as_ids(trained) == bpe.train(bpe.chunk_counts([text]), 200)


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trained(request, tmp_path_factory) -> BPETokenizer:
    root = tmp_path_factory.mktemp(f"bpe-{request.param}")
    files = _write_corpus(root / "corpus", CORPUS)
    return train_tokenizer(files, 256 + 300 + 2, root / "tok", pattern=request.param, special_tokens=["<|pad|>"])


def test_ids_layout(trained):
    assert trained.vocab_size == 558 and len(trained.merges) == 300
    assert (trained.eos_id, trained.special_tokens) == (556, [GPT2_EOT, "<|pad|>"])
    assert trained.decode([556, 557]) == GPT2_EOT + "<|pad|>"


@pytest.mark.parametrize("text", MIXED)
def test_tiktoken_encoding_equals_the_textbook_encoder(trained, text):
    """gptlab encodes with tiktoken (ids as ranks); the reference replays the merges in order: same ids."""
    merges = _hf_merges_as_ids(trained)
    assert trained.encode(text) == bpe.encode(text, merges, trained.pattern)
    assert trained.decode(trained.encode(text)) == text


@pytest.mark.parametrize("text", MIXED)
def test_transformers_gives_gptlabs_ids(trained, text):
    """AutoTokenizer for both patterns; GPT2TokenizerFast for GPT-2's (transformers' GPT-2 class always
    splits with GPT-2's pattern, so a GPT-4-pattern tokenizer names PreTrainedTokenizerFast instead)."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    auto = AutoTokenizer.from_pretrained(trained.directory)
    loaded = [auto] + ([GPT2TokenizerFast.from_pretrained(trained.directory)] if trained.pattern == "gpt2" else [])
    for hf in loaded:
        # special-token strings: ordinary text for gptlab.encode, special ids when allowed (both sides)
        assert hf.encode(text, split_special_tokens=True) == trained.encode(text)
        assert hf.encode(text) == trained.encoding.encode(text, allowed_special="all")
        assert hf.decode(trained.encode(text)) == text
        assert hf.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"]) == [trained.eos_id, trained.eos_id + 1]


def test_gpt2_pattern_also_loads_in_the_slow_tokenizer(tmp_path):
    from transformers import GPT2Tokenizer as SlowGPT2

    files = _write_corpus(tmp_path / "corpus", CORPUS)
    tok = train_tokenizer(files, 500, tmp_path / "tok")
    slow = SlowGPT2.from_pretrained(tmp_path / "tok")
    for text in MIXED:
        assert slow.encode(text, split_special_tokens=True) == tok.encode(text)


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_any_text_round_trips_and_agrees_with_transformers(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert _fast(trained).encode(text, split_special_tokens=True) == ids


_FAST: dict = {}


def _fast(tokenizer: BPETokenizer):
    from transformers import AutoTokenizer

    key = str(tokenizer.directory)
    if key not in _FAST:
        _FAST[key] = AutoTokenizer.from_pretrained(key)
    return _FAST[key]


def test_reload_is_the_same_tokenizer(trained):
    again = load_tokenizer(trained.directory)
    assert isinstance(again, BPETokenizer)
    assert again.fingerprint() == trained.fingerprint() and again.encode(CODE) == trained.encode(CODE)


def test_vocab_that_disagrees_with_merges_is_refused(trained, tmp_path):
    trained.save(tmp_path / "t")
    vocab = json.loads((tmp_path / "t" / "vocab.json").read_text())
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "t" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(GptlabError, match="disagrees with merges.txt"):
        load_tokenizer(tmp_path / "t")


def test_merge_of_unknown_tokens_is_refused():
    with pytest.raises(GptlabError, match="merge 1"):
        BPETokenizer([("ab", "c")])
    with pytest.raises(GptlabError, match="special token"):
        BPETokenizer([("a", "b")], special_tokens=[GPT2_EOT, "ab"])
