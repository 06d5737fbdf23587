"""Reading one input file into text."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gptlab.errors import GptlabError


def read_source(file: Path) -> tuple[str, dict]:
    """The file's text plus its provenance record for meta.json, from a single read."""
    raw = file.read_bytes()
    if b"\x00" in raw:
        raise GptlabError(f"{file} is not a text file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GptlabError(f"{file} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    return text, {"path": str(file), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


