"""A sequence's decoded text, released only when it is final: whole characters, never part of a stop string."""

from __future__ import annotations

import codecs


class TextTracker:
    """One sequence's text as tokens arrive.

    Bytes of a character split across byte-level BPE tokens wait for the rest; a tail that could still
    grow into a stop string is held back until it cannot. Stop strings are matched on the decoded text,
    so one may span tokens or start inside one.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded, not yet released: it may be the start of a stop string

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to release, and whether a stop string completed."""
        self.held += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release()

    def flush(self) -> str:
        """The end of the text: held text, and U+FFFD for the bytes of a character left incomplete."""
        self.held += self.decoder.decode(b"", final=True)
        piece, stopped = self._release()
        return piece if stopped else piece + self._take(len(self.held))

    def _release(self) -> tuple[str, bool]:
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            piece, self.held = self.held[:min(found)], ""
            return piece, True
        return self._take(len(self.held) - self._stop_prefix_length()), False

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that some stop string starts with."""
        longest = min(len(self.held), max((len(s) - 1 for s in self.stop), default=0))
        for n in range(longest, 0, -1):
            if any(s.startswith(self.held[-n:]) for s in self.stop):
                return n
        return 0

    def _take(self, n: int) -> str:
        piece, self.held = self.held[:n], self.held[n:]
        return piece
