"""A conversation with a chat-tuned model, one user line at a time (`gptlab chat`): each turn's prompt is
the whole conversation through the chat template, and the reply streams until the end of the turn."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from ..chat import ChatFormat, Message
from ..errors import GptlabError
from ..model import GPT
from ..tokenizers import Tokenizer
from .offline import TextStream
from .params import SamplingParams


def converse(model: GPT, tokenizer: Tokenizer, lines: Iterable[str], params: SamplingParams, *,
             system: str = "", write: Callable[[str], None], note: Callable[[str], None]) -> list[Message]:
    """Answer each line as the user's next message, writing the reply's pieces as they come and a newline
    after it; returns the conversation. Where it outgrows the context, the oldest turns are dropped
    (never the system message) and `note` says so; a message too long on its own is refused there."""
    chat = ChatFormat.of(tokenizer)
    if chat is None:
        raise GptlabError("the model has no chat template (no chat_template in its tokenizer_config.json); "
                          "tune it with gptlab train --task chat")
    head = [Message("system", system)] if system else []
    turns: list[Message] = []
    for turn, line in enumerate(lines):
        text = line.rstrip("\n")
        turns.append(Message("user", text))
        ids = chat.prompt_ids(head + turns)
        while len(ids) >= model.config.block_size and len(turns) > 1:
            turns = turns[2:] if turns[0].role == "user" and len(turns) > 2 else turns[1:]
            ids = chat.prompt_ids(head + turns)
            note("the conversation outgrew the context: its oldest turn was dropped")
        if len(ids) >= model.config.block_size:
            turns.pop()
            note(f"that message is {len(ids)} tokens with the template, more than the context of "
                 f"{model.config.block_size} allows; not sent")
            continue
        seeded = params if params.seed is None else replace(params, seed=params.seed + turn)
        reply = ""
        for piece in TextStream(model, tokenizer, ids, seeded):
            reply += piece
            write(piece)
        write("\n")
        turns.append(Message("assistant", reply))
    return head + turns
