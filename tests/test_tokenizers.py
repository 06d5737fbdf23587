import hashlib
import json
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.errors import GptlabError
from gptlab.tokenizers import (
    TOKENIZER_FILE,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    load_tokenizer,
)

ASSET_SHA256 = {
    "gpt2_merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "gpt2_vocab.json": "03087853bc70c618b66e7c7a43e787d2db4c469416beac9a483e53dad1f72f27",
}

# Verified against transformers' GPT2TokenizerFast built from the shipped vocab.json + merges.txt.
GOLDEN_GPT2 = {
    "Hello world": [15496, 995],
    "The dog": [464, 3290],
    " hello  world\n\n": [23748, 220, 995, 628],
    "I'm 123 héllo 🙂": [40, 1101, 17031, 289, 2634, 18798, 32485],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],
}

HF_SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "I'm sure they've said: 'it's 1,234.5 apples!'",
    "Ünïcödé, 日本語, emoji 🙂👍🏽 and tabs\tand\nnew lines\n\n\n",
]


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.mark.parametrize("name", sorted(ASSET_SHA256))
def test_asset_checksums(name):
    data = (resources.files("gptlab") / "assets" / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ASSET_SHA256[name]


def test_gpt2_properties(gpt2):
    assert isinstance(gpt2, Tokenizer)
    assert (gpt2.name, gpt2.vocab_size, gpt2.eos_id) == ("gpt2", 50257, 50256)


@pytest.mark.parametrize("text", sorted(GOLDEN_GPT2))
def test_gpt2_golden_ids(gpt2, text):
    assert gpt2.encode(text) == GOLDEN_GPT2[text]
    assert gpt2.decode(GOLDEN_GPT2[text]) == text


def test_load_gpt2_by_name():
    assert load_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_special_token_text_is_ordinary(gpt2):
    assert 50256 not in gpt2.encode("a <|endoftext|> b")


def test_gpt2_decode_eos(gpt2):
    assert gpt2.decode([15496, 50256, 995]) == "Hello<|endoftext|> world"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_gpt2_round_trip(text):
    tok = GPT2Tokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_gpt2_decode_bytes_keeps_partial_utf8(gpt2):
    ids = gpt2.encode("🙂")
    assert len(ids) > 1  # a 4-byte character spread over several byte-level tokens
    head = gpt2.decode_bytes(ids[:1])
    assert "🙂".encode("utf-8").startswith(head) and head != "🙂".encode("utf-8")
    with pytest.raises(UnicodeDecodeError):
        head.decode("utf-8")
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert gpt2.decode_bytes(ids[:1]) + gpt2.decode_bytes(ids[1:]) == "🙂".encode("utf-8")


def test_gpt2_decode_out_of_range(gpt2):
    with pytest.raises(GptlabError, match="50300"):
        gpt2.decode([50300])


def test_gpt2_save_load_round_trip(gpt2, tmp_path):
    gpt2.save(tmp_path)
    assert json.loads((tmp_path / TOKENIZER_FILE).read_text()) == {"type": "gpt2"}
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    assert not (tmp_path / "tokenizer.json").exists()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, GPT2Tokenizer)
    assert loaded.encode("Hello world") == [15496, 995]


def test_saved_gpt2_loads_in_transformers(gpt2, tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in HF_SAMPLES + list(GOLDEN_GPT2):
        if "<|endoftext|>" in text:
            continue  # Hugging Face treats the marker as the special token; we deliberately do not
        assert hf(text)["input_ids"] == gpt2.encode(text), text
    assert hf.eos_token_id == gpt2.eos_id


def test_golden_ids_match_transformers_fast(tmp_path):
    transformers = pytest.importorskip("transformers")
    assets = resources.files("gptlab") / "assets"
    (tmp_path / "vocab.json").write_bytes((assets / "gpt2_vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((assets / "gpt2_merges.txt").read_bytes())
    fast = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    for text, ids in GOLDEN_GPT2.items():
        if "<|endoftext|>" not in text:
            assert fast(text)["input_ids"] == ids, text


def test_hf_checkpoint_dir_loads_as_gpt2(gpt2, tmp_path):
    gpt2.save(tmp_path)
    (tmp_path / TOKENIZER_FILE).unlink()
    assert isinstance(load_tokenizer(tmp_path), GPT2Tokenizer)


def test_hf_checkpoint_with_other_vocab_is_rejected(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(GptlabError, match="not the GPT-2 vocabulary"):
        load_tokenizer(tmp_path)


def test_load_char_by_name_is_an_error():
    with pytest.raises(GptlabError, match="built from a corpus"):
        load_tokenizer("char")


def test_load_unknown_name_or_dir(tmp_path):
    with pytest.raises(GptlabError, match="nonexistent"):
        load_tokenizer(tmp_path / "nonexistent")
    with pytest.raises(GptlabError, match="expected 'gpt2'"):
        load_tokenizer("gpt3")
    with pytest.raises(GptlabError, match=TOKENIZER_FILE):
        load_tokenizer(tmp_path)


def test_load_corrupt_tokenizer_file(tmp_path):
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(GptlabError, match="cannot read"):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(GptlabError, match="not a valid gptlab tokenizer"):
        load_tokenizer(tmp_path)


def test_char_tokenizer_basics():
    tok = CharTokenizer.from_text("hello world")
    assert isinstance(tok, Tokenizer)
    assert tok.name == "char" and tok.eos_id is None
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"
    assert tok.decode_bytes([3, 2]) == b"he"


def test_char_tokenizer_unknown_character_names_char_and_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(GptlabError) as info:
        tok.encode("abcaXb")
    message = str(info.value)
    assert "'X'" in message and "position 4" in message


def test_char_tokenizer_rejects_empty_vocabulary():
    with pytest.raises(GptlabError):
        CharTokenizer.from_text("")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).flatmap(lambda vocab: st.tuples(st.just(vocab), st.text(alphabet=vocab))))
def test_char_round_trip(vocab_and_text):
    vocab, text = vocab_and_text
    tok = CharTokenizer.from_text(vocab)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_char_save_load_round_trip(tmp_path):
    text = "Ünïcödé \"quotes\"\n\ttabs 🙂"
    tok = CharTokenizer.from_text(text)
    tok.save(tmp_path)
    assert json.loads((tmp_path / TOKENIZER_FILE).read_text()) == {"type": "char", "chars": tok.chars}
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer)
    assert loaded.chars == tok.chars
    assert loaded.encode(text) == tok.encode(text)
