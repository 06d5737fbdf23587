"""Tokenizers: a character vocabulary for tiny experiments and GPT-2's exact byte-level BPE.

Both sit behind one small interface so data preparation, training and sampling never care which
one a run uses. A tokenizer is saved next to the data it produced and loaded back by directory,
which keeps a prepared dataset, its checkpoints and its samples consistent with each other.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import tiktoken

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

TOKENIZER_FILE = "gptlab_tokenizer.json"
"""Our own marker file; deliberately not `tokenizer.json`, which means a Hugging Face fast tokenizer."""
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = frozenset({
    TOKENIZER_FILE, HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG, "vocab.json", "merges.txt", "special_tokens_map.json",
})
"""Every file a tokenizer's `save` may write: what a run, an export or a dataset may hold for it."""

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_VOCAB_ASSET = "gpt2_vocab.json"
_MERGES_ASSET = "gpt2_merges.txt"


class Tokenizer(ABC):
    """Text <-> token ids. Implementations must round-trip any text they can encode."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The short name recorded in meta.json and checkpoints ("char" or "gpt2")."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must cover."""

    @property
    @abstractmethod
    def eos_id(self) -> int | None:
        """The document separator id, or None when the vocabulary has none."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special-token strings in the text are ordinary text."""

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes, so a streaming decoder can hold back a UTF-8 character split across tokens."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`; invalid UTF-8 (a token sequence cut mid-character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the files `load_tokenizer(directory)` needs to rebuild this tokenizer."""


class CharTokenizer(Tokenizer):
    """One id per distinct character of a corpus: tiny vocabulary, handy for fast experiments."""

    def __init__(self, chars: Sequence[str]) -> None:
        if not chars:
            raise GptlabError("a character tokenizer needs at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise GptlabError("a character tokenizer's vocabulary must be single characters")
        if len(set(chars)) != len(chars):
            raise GptlabError("a character tokenizer's vocabulary has duplicate characters")
        self._chars = list(chars)
        self._index = {c: i for i, c in enumerate(self._chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Sorted so the same corpus always yields the same ids, whatever order it was read in."""
        return cls(sorted(set(text)))

    @property
    def name(self) -> str:
        return "char"

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    @property
    def eos_id(self) -> int | None:
        return None

    @property
    def chars(self) -> list[str]:
        """The vocabulary in id order."""
        return list(self._chars)

    def encode(self, text: str) -> list[int]:
        index = self._index
        try:
            return [index[c] for c in text]
        except KeyError:
            position, char = next((i, c) for i, c in enumerate(text) if c not in index)
            raise GptlabError(
                f"character {char!r} at position {position} is not in the tokenizer's "
                f"{self.vocab_size}-character vocabulary"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        chars = self._chars
        return "".join(chars[i] for i in _checked_ids(ids, len(chars)))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def save(self, directory: str | Path) -> None:
        """Also writes a Hugging Face fast tokenizer of the same ids, so `AutoTokenizer` reads the directory
        (without one it falls back to a tokenizer that encodes every text to no ids at all)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"type": "char", "chars": self._chars}
        atomic_write_text(directory / TOKENIZER_FILE, json.dumps(payload))
        atomic_write_json(directory / HF_TOKENIZER_FILE, self._hf_tokenizer())
        atomic_write_json(directory / HF_TOKENIZER_CONFIG, {
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        })

    def _hf_tokenizer(self) -> dict:
        """The `tokenizers` library's format for this vocabulary: every character its own piece (a Split on
        any one character, newlines included), each piece looked up in a word-level vocabulary of the same
        ids, and decoding that fuses the pieces with nothing between them. No normalizer: the text is
        taken as it is, as encode() takes it; a character outside the vocabulary is an error there too."""
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None,
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": dict(self._index), "unk_token": "<unk>"},
        }


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE, bit-for-bit, built offline from the vocabulary files we ship."""

    def __init__(self) -> None:
        self._encoding = _gpt2_encoding()

    @property
    def name(self) -> str:
        return "gpt2"

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB_SIZE

    @property
    def eos_id(self) -> int | None:
        return GPT2_VOCAB_SIZE - 1

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._encoding.decode_bytes(_checked_ids(ids, GPT2_VOCAB_SIZE))

    def save(self, directory: str | Path) -> None:
        """Also writes Hugging Face's slow-tokenizer files, so `AutoTokenizer` can read the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, json.dumps({"type": "gpt2"}))
        atomic_write_bytes(directory / "vocab.json", _asset_bytes(_VOCAB_ASSET))
        atomic_write_bytes(directory / "merges.txt", _asset_bytes(_MERGES_ASSET))
        special = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT}
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": 1024,
            **special,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
        }
        atomic_write_json(directory / "tokenizer_config.json", config)
        atomic_write_json(directory / "special_tokens_map.json", special)


def load_tokenizer(name_or_dir: str | Path) -> Tokenizer:
    """Accept a tokenizer name ("gpt2") or a directory saved by `Tokenizer.save` or Hugging Face.

    A plain string equal to a tokenizer name is always the name, never a directory of that name;
    pass a `Path` to force a directory.
    """
    if isinstance(name_or_dir, str):
        if name_or_dir == "gpt2":
            return GPT2Tokenizer()
        if name_or_dir == "char":
            raise GptlabError(
                "the char tokenizer is built from a corpus; run gptlab prepare --tokenizer char "
                "and load it from the prepared data directory"
            )
    path = Path(name_or_dir)
    expected = f"expected 'gpt2' or a directory containing {TOKENIZER_FILE} (or GPT-2's vocab.json + merges.txt)"
    if not path.is_dir():
        raise GptlabError(f"no tokenizer at {str(path)!r}: {expected}")
    if (path / TOKENIZER_FILE).is_file():
        return _load_saved(path / TOKENIZER_FILE)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _load_hf_gpt2(path / "vocab.json")
    raise GptlabError(f"{str(path)!r} holds no tokenizer: {expected}")


def _load_saved(file: Path) -> Tokenizer:
    payload = _read_json(file)
    kind = payload.get("type") if isinstance(payload, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char" and isinstance(payload.get("chars"), list):
        try:
            return CharTokenizer(payload["chars"])
        except GptlabError as exc:
            raise GptlabError(f"{file}: {exc}") from None
    raise GptlabError(f"{file} is not a valid gptlab tokenizer file (expected type 'char' with chars, or 'gpt2')")


def _load_hf_gpt2(vocab_file: Path) -> Tokenizer:
    """Only GPT-2's own vocabulary is supported: any other BPE would silently produce wrong ids."""
    vocab = _read_json(vocab_file)
    if vocab != _gpt2_vocab():
        size = len(vocab) if isinstance(vocab, dict) else "?"
        raise GptlabError(
            f"{vocab_file} ({size} entries) is not the GPT-2 vocabulary; other vocabularies are unsupported"
        )
    return GPT2Tokenizer()


def _checked_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """Turn an out-of-range id (e.g. from a model with a padded vocabulary) into a clear error."""
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise GptlabError(f"token id {bad} is outside the tokenizer's vocabulary of {vocab_size}")
    return ids


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    """Building the 50k-entry rank table takes a moment, so every GPT2Tokenizer shares one.

    GPT-2's ids for merged tokens are assigned in merge order, so a token's id is exactly its BPE
    rank; that lets the ranks come straight from vocab.json.
    """
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    ranks = {
        bytes(byte_of[ch] for ch in token): token_id
        for token, token_id in _gpt2_vocab().items()
        if token != GPT2_EOT
    }
    return tiktoken.Encoding(
        name="gptlab-gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT: GPT2_VOCAB_SIZE - 1},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


@functools.lru_cache(maxsize=1)
def _gpt2_vocab() -> dict[str, int]:
    return json.loads(_asset_bytes(_VOCAB_ASSET))


def gpt2_vocab() -> dict[str, int]:
    """GPT-2's vocab.json: each token as its byte-level string (see `_bytes_to_unicode`) -> its id."""
    return dict(_gpt2_vocab())


def gpt2_merges() -> list[str]:
    """GPT-2's merges in rank order, each 'left right' as merges.txt writes it (its version line dropped)."""
    lines = _asset_bytes(_MERGES_ASSET).decode("utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#version")]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 stores each byte as a printable character so vocab.json can be plain text.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in byte order,
    to the code points from U+0100 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    for offset, b in enumerate(shifted):
        mapping[b] = chr(256 + offset)
    return mapping


def _asset_bytes(filename: str) -> bytes:
    """Read through importlib.resources so the assets are found in an installed wheel too."""
    return (resources.files("gptlab") / "assets" / filename).read_bytes()


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptlabError(f"cannot read {file}: {exc}") from None


def document_start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt means: a new document, i.e. GPT-2's end-of-text token, or a newline."""
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    try:
        return tokenizer.encode("\n")
    except GptlabError:
        return [0]
