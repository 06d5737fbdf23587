"""Conversations for supervised fine-tuning (`gptlab train --task chat --data FILE`, or `--hf-dataset NAME`).

FILE holds JSON lines (a Hugging Face dataset, records), each one conversation in one of three shapes: OpenAI's `{"messages": [...]}`
(system, user and assistant turns), `{"prompt", "completion"}` pairs, or Alpaca's
`{"instruction", "input", "output"}`. Each becomes ids through the chat template (gptlab.chat), with the
labels IGNORE everywhere but on the assistant's content and its end-of-turn token, so the loss is the
assistant's alone.

A window holds one conversation, padded after its end (x with the end-of-text id, y with IGNORE): under
causal attention a token never sees the padding after it, and no conversation shares a window, so none
reads another's tokens. Every check is made when the file is read, before the run directory is touched.
`ChatDataset` has `TokenDataset`'s batching interface, so the training loop trains on it unchanged.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..chat import CHAT_TEMPLATE, IGNORE, ChatFormat, parse_messages
from ..data.inputs import hf_source
from ..errors import GptlabError
from ..tokenizers import Tokenizer

VAL_EVERY = 10  # every tenth conversation is held out for the validation loss


def conversation_messages(record: object) -> object:
    """The OpenAI-style messages of one record of any of the three shapes (checked later, by parse_messages)."""
    if not isinstance(record, dict):
        raise GptlabError("expected a JSON object with messages, prompt/completion or instruction/output")
    if "messages" in record:
        return record["messages"]
    if "prompt" in record and "completion" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    if "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        if not isinstance(record["instruction"], str) or not isinstance(extra, str):
            raise GptlabError("instruction and input must be strings")
        question = record["instruction"] + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]
    raise GptlabError(f"expected messages, prompt/completion or instruction/output; got keys {sorted(record)}")


Conversation = tuple[list[int], list[int]]  # (ids, labels)


def read_conversations(path: Path, chat: ChatFormat, block_size: int) -> list[Conversation]:
    """(ids, labels) per conversation of the file; the first fault is one line naming the line it is on."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GptlabError(f"--data {path}: cannot read it as a JSON-lines file of conversations: {exc}") from None

    def records() -> Iterator[tuple[str, object]]:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GptlabError(f"{path}:{number}: not JSON ({exc.msg})") from None

    return encode_conversations(records(), f"--data {path}", chat, block_size)


def hf_conversations(name: str, config: str | None, split: str, chat: ChatFormat, block_size: int) -> list[Conversation]:
    """(ids, labels) per record of a Hugging Face dataset (a save_to_disk directory, data files or a Hub
    name, as prepare opens it); the first fault is one line naming the record."""
    records = hf_source(name, config or None, split).dataset
    return encode_conversations(((f"{name}[{i}]", record) for i, record in enumerate(records)),
                                f"--hf-dataset {name}", chat, block_size)


def encode_conversations(
    records: Iterable[tuple[str, object]], source: str, chat: ChatFormat, block_size: int,
) -> list[Conversation]:
    """Each (where, record) as (ids, labels) through the template; a fault is one line naming `where`."""
    conversations = []
    for where, record in records:
        try:
            ids, labels = chat.training_ids(parse_messages(conversation_messages(record), "messages"))
        except GptlabError as exc:
            raise GptlabError(f"{where}: {exc}") from None
        if len(ids) > block_size + 1:
            raise GptlabError(f"{where}: the conversation has {len(ids)} tokens, longer than the context "
                              f"(--block-size {block_size} + 1); shorten it or raise --block-size")
        conversations.append((ids, labels))
    if not conversations:
        raise GptlabError(f"{source}: no conversations in it")
    return conversations


class ChatDataset:
    """A file (or a Hugging Face dataset) of conversations as padded windows, split into train and validation."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, block_size: int, *, hf_dataset: str = "",
                 hf_config: str = "", hf_split: str = "train") -> None:
        self.path = Path(hf_dataset or path)
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer)
        tokenizer.chat_template = CHAT_TEMPLATE  # the run saves the template it was tuned on
        if hf_dataset:
            conversations = hf_conversations(hf_dataset, hf_config, hf_split, self.chat, block_size)
        else:
            conversations = read_conversations(self.path, self.chat, block_size)
        held_out = [c for i, c in enumerate(conversations) if i % VAL_EVERY == VAL_EVERY - 1]
        trained = [c for i, c in enumerate(conversations) if i % VAL_EVERY != VAL_EVERY - 1]
        if not held_out:
            print(f"{self.path}: {len(conversations)} conversations, too few to hold one in {VAL_EVERY} out; the "
                  "validation loss is taken on the training conversations", file=sys.stderr)
            held_out = trained
        self._splits = {"train": trained, "val": held_out}

    def split(self, name: str) -> list[tuple[list[int], list[int]]]:
        if name not in self._splits:
            raise GptlabError(f"unknown split {name!r}; expected 'train' or 'val'")
        return self._splits[name]

    def check_length(self, split: str, block_size: int) -> list[tuple[list[int], list[int]]]:
        """Every conversation fits block_size + 1 tokens already (read_conversations refused any other)."""
        conversations = self.split(split)
        longest = max(len(ids) for ids, _ in conversations)
        if longest > block_size + 1:
            raise GptlabError(f"--block-size {block_size} is shorter than a conversation of {self.path} "
                              f"({longest} tokens)")
        return conversations

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, *,
        rows: slice | None = None, pin_memory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random conversations, one a row: x is (B, T) and y the labels shifted left, T the longest
        drawn conversation less one, shorter ones padded. As TokenDataset's: all `batch_size` draws are
        made, `rows` picks this process's, `pin_memory` page-locks them."""
        conversations = self.check_length(split, block_size)
        picked = rng.integers(0, len(conversations), size=batch_size)  # (B,)
        chosen = [conversations[i] for i in (picked if rows is None else picked[rows])]
        width = max(len(ids) for ids, _ in chosen) - 1
        x = torch.full((len(chosen), width), self.chat.eos_id, dtype=torch.long)  # (B, T)
        y = torch.full((len(chosen), width), IGNORE, dtype=torch.long)  # (B, T)
        for row, (ids, labels) in enumerate(chosen):
            x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, : len(ids) - 1] = torch.tensor(labels[1:])
        return (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)
