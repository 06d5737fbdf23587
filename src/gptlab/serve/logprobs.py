"""Token log-probabilities in the shape of OpenAI's legacy completions API (`choices[].logprobs`)."""

from __future__ import annotations

import codecs
from collections.abc import Sequence as Seq

from ..inference import TokenLogprobs
from ..tokenizers import Tokenizer
from .schemas import CompletionLogprobs

FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens with this value too


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text; one whose bytes are not whole UTF-8 as `bytes:\\xNN...`, as OpenAI writes it."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class OffsetCounter:
    """Where each next token's text starts, counting the characters decoded before it (a character
    split across tokens belongs to the token that starts it)."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = start

    def next(self, token: int) -> int:
        at = self.chars
        self.chars += len(self.decoder.decode(self.tokenizer.decode_bytes([token])))
        return at


def api_logprobs(tokenizer: Tokenizer, entries: Seq[TokenLogprobs], offsets: OffsetCounter) -> CompletionLogprobs:
    """The API's logprobs object for `entries` (a prompt's first entry has no log-probability)."""
    return CompletionLogprobs(
        tokens=[token_text(tokenizer, e.token) for e in entries],
        token_logprobs=[None if e.logprob is None else max(e.logprob, FLOOR) for e in entries],
        top_logprobs=[None if e.logprob is None else
                      {token_text(tokenizer, t): max(v, FLOOR) for t, v in e.top.items()} for e in entries],
        text_offset=[offsets.next(e.token) for e in entries],
    )


def joined(parts: Seq[CompletionLogprobs]) -> CompletionLogprobs:
    """Several spans of one choice (the prompt's, the completion's) as one."""
    return CompletionLogprobs(tokens=[t for p in parts for t in p.tokens],
                              token_logprobs=[v for p in parts for v in p.token_logprobs],
                              top_logprobs=[v for p in parts for v in p.top_logprobs],
                              text_offset=[v for p in parts for v in p.text_offset])
