"""`gptlab tokenizer train`: a byte-level BPE learned from a corpus, streamed, written in GPT-2's format.

The corpus is read exactly as `prepare` reads it (the same inputs, formats and readers, a piece of
at most a megabyte at a time) and fed to Hugging Face `tokenizers`' BPE trainer, which runs the
algorithm of `gptlab.bpe` (the readable reference: same pre-tokenizer, same merges, same tie rule;
the tests compare the two) in Rust on every core. What it keeps is a count per distinct pre-tokenized
chunk, not the text, so memory grows with the corpus's vocabulary of words, not with its size.
The merges then become a `BPETokenizer`, whose ids are GPT-2's layout: bytes, merges, special tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ..bpe import PATTERNS
from .inputs import Source, file_sources, hf_source
from .readers import Corpus
from ..errors import GptlabError
from ..tokenizers import GPT2_EOT, TOKENIZER_FILE, BPETokenizer

TOKENIZER_FILES = frozenset({TOKENIZER_FILE, "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json"})


def train_tokenizer(
    inputs: list[str], vocab_size: int, out: str | Path, *, pattern: str = "gpt2",
    special_tokens: Sequence[str] = (), text_field: str = "text", hf_dataset: str | None = None,
    hf_config: str | None = None, hf_split: str = "train", skip_binary: bool = False, overwrite: bool = False,
) -> BPETokenizer:
    """Learn `vocab_size` tokens (256 bytes, merges, special tokens) from the corpus and save them in `out`.

    `<|endoftext|>` is always the first special token; `special_tokens` adds more. Everything is
    checked before the corpus is read, and nothing is written until training is done.
    """
    specials = [GPT2_EOT, *(s for s in dict.fromkeys(special_tokens) if s != GPT2_EOT)]
    if not all(specials):
        raise GptlabError("a special token cannot be empty")
    if pattern not in PATTERNS:
        raise GptlabError(f"unknown pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")
    if vocab_size < 256 + len(specials):
        raise GptlabError(f"--vocab-size {vocab_size} is too small: it must hold the 256 bytes and the "
                          f"{len(specials)} special tokens, at least {256 + len(specials)}")
    out = _checked_out(out, overwrite)
    sources: list[Source] = list(file_sources(inputs, exclude=out)) if inputs or not hf_dataset else []
    if hf_dataset:
        sources.append(hf_source(hf_dataset, hf_config, hf_split))
    merges = _learn_merges(Corpus(sources, text_field, skip_binary), vocab_size, pattern, specials)
    tokenizer = BPETokenizer(merges, pattern, specials, out)
    tokenizer.save(out)
    return tokenizer


def _checked_out(out: str | Path, overwrite: bool) -> Path:
    """A new or empty directory, or (with `overwrite`) one holding only a tokenizer's files."""
    if not str(out).strip():
        raise GptlabError("--out is empty; name the directory to write the tokenizer into")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} is a file, not a directory")
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if present - TOKENIZER_FILES:
        raise GptlabError(f"{out} holds files other than a tokenizer's ({', '.join(sorted(present - TOKENIZER_FILES)[:3])}); "
                          "choose a new or empty --out")
    if present and not overwrite:
        raise GptlabError(f"{out} already holds a tokenizer; use --overwrite to replace it")
    return out


def _learn_merges(corpus: Corpus, vocab_size: int, pattern: str, specials: list[str]) -> list[tuple[str, str]]:
    """Hugging Face's trainer on the corpus's pieces; its merges, as pairs of GPT-2 byte characters."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [False]

    def texts() -> Iterator[str]:
        for piece in corpus.pieces():
            if piece.text:
                seen[0] = seen[0] or not piece.text.isspace()
                yield piece.text

    hf.train_from_iterator(texts(), trainer)
    if not seen[0]:
        raise GptlabError("the corpus is empty: every input is empty or whitespace only")
    merges = json.loads(hf.to_str())["model"]["merges"]  # pairs; "a b" strings before tokenizers 0.20
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]  # type: ignore[misc]
