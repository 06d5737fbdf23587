"""What `gptlab serve` accepts and holds: `ServerLimits`, whose fields are the server's options.

Each field's metadata is its option's help line (and its name where it is not the field's), so the
command line generates the options from this class, as `train`'s come from `TrainConfig`, and checks
them here, once. This module imports neither torch nor the web stack: `gptlab --help` reads it.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields

from ..errors import GptlabError


def _limit(default: int, help: str, metavar: str, option: str | None = None) -> int:
    return field(default=default, metadata={"help": help, "metavar": metavar, "option": option})


@dataclass(frozen=True)
class ServerLimits:
    """What the server accepts and holds; every field is a positive integer."""

    max_tokens: int = _limit(256, "the largest max_tokens a request may ask for", "TOKENS", "--max-tokens-limit")
    max_body_bytes: int = _limit(1 << 20, "larger request bodies are refused with 413 before they are parsed",
                                 "BYTES")
    max_choices: int = _limit(16, "the most choices (prompts x n) one request may ask for", "N")
    max_batch: int = _limit(16, "sequences advanced together in one step; 1 runs them one at a time", "N")
    max_queue: int = _limit(64, "sequences that may wait for a place in the batch; beyond, requests get 429", "N")
    kv_cache_mb: int = _limit(1024, "MiB the KV cache may hold (sequences wait while the running ones fill it)",
                              "MIB")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GptlabError(f"{option_name(f)} must be at least 1, got {value!r}")


def option_name(f: Field) -> str:
    """The command-line option of a dataclass field: its metadata's "option", or the field's name as a flag."""
    return f.metadata.get("option") or "--" + f.name.replace("_", "-")
