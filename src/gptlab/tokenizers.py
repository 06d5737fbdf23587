"""Tokenizers: a character vocabulary for tiny experiments, GPT-2's exact byte-level BPE, and byte-level
BPEs trained on one's own corpus (`gptlab tokenizer train`, see gptlab.data.tokenizer_training).

Both sit behind one small interface so data preparation, training and sampling never care which
one a run uses. A tokenizer is saved next to the data it produced and loaded back by directory,
which keeps a prepared dataset, its checkpoints and its samples consistent with each other.
"""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import tiktoken

from gptlab.bpe import PATTERNS, bytes_to_unicode
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

    chat_template: str | None = None
    """The Jinja chat template saved in tokenizer_config.json (as Hugging Face keeps it), or None; a run
    tuned with `--task chat` sets it (gptlab.chat), so the run and its exports carry it."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The short name recorded in meta.json and checkpoints ("char", "gpt2" or "bpe")."""

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

    def _chat_template_entry(self) -> dict[str, str]:
        return {"chat_template": self.chat_template} if self.chat_template else {}


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
            **self._chat_template_entry(),
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
        tokenizer = _load_saved(path / TOKENIZER_FILE)
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tokenizer = _load_hf_gpt2(path / "vocab.json")
    else:
        raise GptlabError(f"{str(path)!r} holds no tokenizer: {expected}")
    tokenizer.chat_template = _saved_chat_template(path)
    return tokenizer


def _saved_chat_template(directory: Path) -> str | None:
    """tokenizer_config.json's `chat_template`, where it holds one string (Hugging Face's place for it)."""
    if not (directory / HF_TOKENIZER_CONFIG).is_file():
        return None
    config = _read_json(directory / HF_TOKENIZER_CONFIG)
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template else None


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
    if kind == "bpe":
        return BPETokenizer.load(file.parent, payload)
    raise GptlabError(f"{file} is not a valid gptlab tokenizer file (expected type 'char' with chars, 'gpt2' or 'bpe')")


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
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
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
    """GPT-2's vocab.json: each token as its byte-level string (see `gptlab.bpe.bytes_to_unicode`) -> its id."""
    return dict(_gpt2_vocab())


def gpt2_merges() -> list[str]:
    """GPT-2's merges in rank order, each 'left right' as merges.txt writes it (its version line dropped)."""
    lines = _asset_bytes(_MERGES_ASSET).decode("utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#version")]


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


class BPETokenizer(Tokenizer):
    """A byte-level BPE of one's own (`gptlab tokenizer train`), in GPT-2's files: vocab.json + merges.txt.

    The merges define it. Ids: the 256 bytes in GPT-2's order, then one token per merge in merge
    order, then the special tokens (`<|endoftext|>` first). As in GPT-2, every merged token's id is
    its merge rank, so tiktoken, given the ids as ranks, encodes as Hugging Face's BPE does with
    merges.txt (for merges learned by BPE training, where every merge joins a pair seen in training;
    the tests check it on mixed and random text); gptlab encodes with tiktoken, which is fast. The pre-tokenizer's pattern is
    GPT-2's or GPT-4's (`gptlab.bpe.PATTERNS`); `save` also writes a Hugging Face `tokenizer.json`
    holding it, which `AutoTokenizer` reads (transformers' GPT-2 class assumes GPT-2's pattern).
    """

    def __init__(self, merges: Sequence[tuple[str, str]], pattern: str = "gpt2",
                 special_tokens: Sequence[str] = (GPT2_EOT,), directory: Path | None = None) -> None:
        if pattern not in PATTERNS:
            raise GptlabError(f"unknown pre-tokenizer pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")
        if not special_tokens or special_tokens[0] != GPT2_EOT or len(set(special_tokens)) != len(special_tokens) \
                or not all(isinstance(s, str) and s for s in special_tokens):
            raise GptlabError(f"special tokens must be distinct non-empty strings, {GPT2_EOT} first")
        vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
        for number, (a, b) in enumerate(merges, start=1):
            if a not in vocab or b not in vocab:
                raise GptlabError(f"merge {number} ({a} {b}) joins a token that no earlier merge made")
            if a + b in vocab:
                raise GptlabError(f"merge {number} ({a} {b}) makes a token an earlier merge made; each merge must "
                                  "make a new token")
            vocab[a + b] = len(vocab)
        for special in special_tokens:
            if special in vocab:
                raise GptlabError(f"the special token {special!r} is also a learned token; choose one that cannot "
                                  "be a word of the corpus, e.g. <|name|>")
            vocab[special] = len(vocab)
        self._merges = [(a, b) for a, b in merges]
        self._vocab = vocab
        self.pattern = pattern
        self.special_tokens = list(special_tokens)
        self.directory = directory
        byte_of = {char: b for b, char in bytes_to_unicode().items()}
        self._encoding = tiktoken.Encoding(
            name=f"gptlab-bpe-{len(vocab)}",
            pat_str=PATTERNS[pattern],
            mergeable_ranks={bytes(byte_of[c] for c in token): i for token, i in vocab.items()
                             if i < len(vocab) - len(special_tokens)},
            special_tokens={special: vocab[special] for special in special_tokens},
            explicit_n_vocab=len(vocab),
        )

    @classmethod
    def load(cls, directory: Path, marker: dict) -> BPETokenizer:
        """Rebuild from the files `save` wrote, refusing a vocab.json that the merges do not produce."""
        pattern, specials = marker.get("pattern"), marker.get("special_tokens")
        if not isinstance(pattern, str) or not isinstance(specials, list):
            raise GptlabError(f"{directory / TOKENIZER_FILE}: a bpe tokenizer needs a pattern and special_tokens")
        try:
            lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise GptlabError(f"cannot read {directory / 'merges.txt'}: {exc}") from None
        if lines and lines[0].startswith("#version"):  # the header line (only the first: "#version" can be a token)
            lines = lines[1:]
        merges = [tuple(line.split(" ")) for line in lines if line]
        if any(len(merge) != 2 for merge in merges):
            raise GptlabError(f"{directory / 'merges.txt'}: every line must be two tokens separated by one space")
        tokenizer = cls(merges, pattern, specials, directory)  # type: ignore[arg-type]
        if _read_json(directory / "vocab.json") != tokenizer._vocab:
            raise GptlabError(f"{directory / 'vocab.json'} disagrees with merges.txt (not the vocabulary they make); "
                              "train the tokenizer again")
        return tokenizer

    @property
    def name(self) -> str:
        return "bpe"

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eos_id(self) -> int | None:
        return self._vocab[GPT2_EOT]

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The merges in the order they were learned, as GPT-2's byte characters (merges.txt)."""
        return list(self._merges)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding: `encode(text, allowed_special="all")` also turns special tokens into ids."""
        return self._encoding

    def fingerprint(self) -> str:
        """What tells two such tokenizers apart (the same size does not)."""
        payload = json.dumps([self.pattern, self.special_tokens, self._merges]).encode("utf-8")
        return hashlib.sha256(payload).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._encoding.decode_bytes(_checked_ids(ids, self.vocab_size))

    def save(self, directory: str | Path) -> None:
        """GPT-2's files, transformers' configuration and a Hugging Face tokenizer.json, plus our marker."""
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hf = HFTokenizer(models.BPE(vocab=self._vocab, merges=self._merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERNS[self.pattern]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        hf.add_special_tokens(self.special_tokens)
        atomic_write_text(directory / "tokenizer.json", hf.to_str())
        atomic_write_text(directory / "vocab.json", json.dumps(self._vocab, ensure_ascii=False))
        atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges))
        special = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT,
                   "additional_special_tokens": self.special_tokens[1:]}
        # transformers' GPT-2 class rebuilds GPT-2's pre-tokenizer whatever tokenizer.json says, so another
        # pattern names the generic class, which reads tokenizer.json as it is
        kind = "GPT2Tokenizer" if self.pattern == "gpt2" else "PreTrainedTokenizerFast"
        config = {"tokenizer_class": kind, **special, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                  **self._chat_template_entry()}
        atomic_write_json(directory / "tokenizer_config.json", config)
        atomic_write_json(directory / "special_tokens_map.json", special)
        marker = {"type": "bpe", "pattern": self.pattern, "special_tokens": self.special_tokens,
                  "vocab": "vocab.json", "merges": "merges.txt"}
        atomic_write_text(directory / TOKENIZER_FILE, json.dumps(marker))
