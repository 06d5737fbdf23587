"""The chat template: how a conversation becomes token ids, for tuning (with the assistant's tokens marked
for the loss), for serving (`/v1/chat/completions`) and for `gptlab chat`.

One template, chosen to add no token to the vocabulary: the model keeps GPT-2's 50,257 ids (or a trained
BPE's), so a tuned run exports, loads and quantizes as any other. Each message is a plain-text role header
and its content, ended by the end-of-text token, and the conversation opens with it too:

    <|endoftext|><|system|>\\nBe brief.<|endoftext|><|user|>\\nWhat is 38 + 47?<|endoftext|><|assistant|>\\n85<|endoftext|>

`<|user|>` and the other headers are ordinary text (a few BPE tokens each); only `<|endoftext|>` is a
special token, and it is the tokenizer's eos, so generation stops at the end of the assistant's turn with
nothing more than the engine's stop at eos. A character tokenizer has no such token, so a char model has
no chat template. The same template is saved in Jinja as `chat_template` in tokenizer_config.json, where
`transformers`' `apply_chat_template` finds it and gives the same ids (tests/test_chat.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import GptlabError
from .tokenizers import GPT2_EOT, Tokenizer

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the target value cross-entropy skips

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""The template in Hugging Face's Jinja, rendered with bos_token = eos_token = `<|endoftext|>`."""


def header(role: str) -> str:
    return f"<|{role}|>\n"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def parse_messages(raw: object, where: str = "messages") -> list[Message]:
    """Checked messages from OpenAI-style dicts; one line naming the fault otherwise.

    `content` is a string, or OpenAI's list of `{"type": "text", "text": ...}` parts, joined. The end-of-text
    token's text is refused inside content: Hugging Face would read it as the special token, gptlab as text."""
    if not isinstance(raw, list) or not raw:
        raise GptlabError(f"{where} must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise GptlabError(f"{where}[{i}] must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise GptlabError(f"{where}[{i}]: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise GptlabError(f"{where}[{i}]: content must be a string (or a list of text parts)")
        if GPT2_EOT in content:
            raise GptlabError(f"{where}[{i}]: content must not contain {GPT2_EOT}, the end-of-turn token")
        messages.append(Message(role, content))
    return messages


class ChatFormat:
    """The template over one tokenizer: conversations to ids, as `apply_chat_template` gives them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        if tokenizer.eos_id is None:
            raise GptlabError(f"a {tokenizer.name} tokenizer has no end-of-text token, so no chat template; "
                              "chat needs a GPT-2 or trained-BPE model")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ChatFormat | None:
        """The format of a model's tokenizer when it carries gptlab's template; None when it has none."""
        if tokenizer.chat_template is None:
            return None
        if tokenizer.chat_template != CHAT_TEMPLATE:
            raise GptlabError("the model's chat template (tokenizer_config.json) is not gptlab's; "
                              "only gptlab's template is supported (docs/chat.md)")
        return cls(tokenizer)

    def message_ids(self, message: Message) -> tuple[list[int], int]:
        """The message's ids (header, content and end-of-text) and how many of them the header's are.

        Header and content are encoded as one text, as Hugging Face does; the header's share is the
        longest prefix they share with the header alone (all of it, unless the content merges into the
        header's newline, as a content starting with a newline does)."""
        ids = self.tokenizer.encode(header(message.role) + message.content) + [self.eos_id]
        alone = self.tokenizer.encode(header(message.role))
        shared = 0
        while shared < len(alone) and ids[shared] == alone[shared]:
            shared += 1
        return ids, shared

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The conversation so far, then the assistant's header: what the model continues."""
        ids = [self.eos_id]
        for message in messages:
            ids += self.message_ids(message)[0]
        return ids + self.tokenizer.encode(header("assistant"))

    def training_ids(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """The whole conversation's ids and, aligned with them, the labels: each assistant message's content
        and closing end-of-text keep their id, everything else (headers, other roles) is IGNORE."""
        if not any(m.role == "assistant" for m in messages):
            raise GptlabError("a conversation has no assistant turn to learn from")
        ids, labels = [self.eos_id], [IGNORE]
        for message in messages:
            part, head = self.message_ids(message)
            if message.role == "assistant" and not message.content.strip():
                raise GptlabError("an assistant turn is empty")
            ids += part
            labels += [IGNORE] * head + (part[head:] if message.role == "assistant" else [IGNORE] * (len(part) - head))
        return ids, labels
