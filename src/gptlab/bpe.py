"""Byte-level BPE training, the textbook algorithm (as minbpe teaches it), readable in one sitting.

1. Pre-tokenize: a regular expression cuts the text into chunks (words, numbers, punctuation runs,
   whitespace runs) so that no token ever spans two of them, e.g. "dog." never becomes one token.
2. Count the chunks: the same chunk anywhere in the corpus trains the same way, so training works on
   {chunk bytes: how often it occurs}, which is far smaller than the corpus.
3. Start with one token per byte value (256 of them: any text can be encoded, nothing is unknown).
4. Repeat: count every adjacent pair of tokens over all chunks (weighted by the chunk's count), merge
   the most frequent pair into a new token everywhere, and record that merge. Ties go to the pair of
   smallest ids, first token first. Stop after the wanted number of merges or when no pair is left.

Encoding replays the merges in the order they were learned. Ids: the 256 bytes first, in GPT-2's order
(the printable bytes, then the rest: see `bytes_to_unicode`), then one id per merge in order, then the
special tokens. This order also makes the tie rule the one Hugging Face `tokenizers` applies, so its
trainer (which `gptlab tokenizer train` runs, being much faster) learns the same merges: the tests
check it on a corpus. This module is the reference: clear, and slow (every step recounts every pair).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import regex

PATTERNS = {
    # GPT-2's split: contractions, letters, numbers, other symbols, whitespace (a space stays in front of a word)
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4's (cl100k): case-insensitive contractions, numbers of at most 3 digits, newlines kept apart
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 stores each byte as a printable character so that vocab.json and merges.txt are plain text.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in byte order, to
    the code points from U+0100 upwards. The dict's order (printable bytes first) is GPT-2's order of
    its 256 base tokens, which is also the order of their characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    for offset, b in enumerate(shifted):
        mapping[b] = chr(256 + offset)
    return mapping


BYTE_ORDER = list(bytes_to_unicode())  # BYTE_ORDER[token id] = byte value, for ids 0..255
BYTE_ID = {b: i for i, b in enumerate(BYTE_ORDER)}  # byte value -> its token id


def chunk_counts(texts: Iterable[str], pattern: str = "gpt2") -> Counter[bytes]:
    """Steps 1 and 2: how often each pre-tokenized chunk occurs, as UTF-8 bytes."""
    split = regex.compile(PATTERNS[pattern])
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(chunk.encode("utf-8") for chunk in split.findall(text))
    return counts


def train(counts: Mapping[bytes, int], num_merges: int) -> list[tuple[int, int]]:
    """Steps 3 and 4: the merges, in order; merge i makes token 256 + i from the pair of ids it holds."""
    words = [([BYTE_ID[b] for b in chunk], count) for chunk, count in counts.items()]
    merges: list[tuple[int, int]] = []
    for new_id in range(256, 256 + num_merges):
        pairs: Counter[tuple[int, int]] = Counter()
        for ids, count in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every chunk is a single token: nothing left to merge
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent; ties: smallest ids
        words = [(merge(ids, best, new_id), count) for ids, count in words]
        merges.append(best)
    return merges


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def token_bytes(merges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of every token id the merges define (ids 0 .. 255 + len(merges))."""
    vocab = [bytes([b]) for b in BYTE_ORDER]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    return vocab


def encode(text: str, merges: list[tuple[int, int]], pattern: str = "gpt2") -> list[int]:
    """Encoding, the textbook way: per chunk, apply the earliest learned merge present until none is."""
    rank = {pair: 256 + i for i, pair in enumerate(merges)}
    ids: list[int] = []
    for chunk in regex.findall(PATTERNS[pattern], text):
        tokens = [BYTE_ID[b] for b in chunk.encode("utf-8")]
        while len(tokens) > 1:
            pair = min(zip(tokens, tokens[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            tokens = merge(tokens, pair, rank[pair])
        ids.extend(tokens)
    return ids
