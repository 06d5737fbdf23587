"""The chat template: gptlab's ids for a conversation are transformers' `apply_chat_template` ids for the
saved run, and the training labels keep exactly the assistant's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptlab.chat import CHAT_TEMPLATE, IGNORE, ChatFormat, header, parse_messages
from gptlab.checkpoint import save_model
from gptlab.errors import GptlabError
from gptlab.inference import load_pretrained
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer, load_tokenizer
from helpers import tiny_model

CONVERSATIONS = [
    [{"role": "user", "content": "What is 38 + 47?"}],
    [{"role": "system", "content": "You add numbers.  Briefly!"},
     {"role": "user", "content": "What is 38 + 47?"},
     {"role": "assistant", "content": "85"},
     {"role": "user", "content": " and\n\n12+1 ?\n"}],
    [{"role": "user", "content": "\nleading newline, café, 東京, emoji 🎉"},
     {"role": "assistant", "content": "  spaces first\tand tabs"},
     {"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-vocabulary model with random weights, saved as a run with gptlab's chat template."""
    run = tmp_path_factory.mktemp("chat") / "run"
    save_model(tiny_model(vocab_size=50257, block_size=64), run)
    tokenizer = GPT2Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save(run)
    return run


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_transformers_apply_chat_template_gives_gptlabs_ids(chat_run: Path, messages: list[dict]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(chat_run))
    _, tokenizer = load_pretrained(chat_run)
    chat = ChatFormat.of(tokenizer)
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected)
    assert chat.prompt_ids(parse_messages(messages)) == expected
    whole = messages + [{"role": "assistant", "content": "85"}]
    full = hf.apply_chat_template(whole, tokenize=True, add_generation_prompt=False)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert chat.training_ids(parse_messages(whole))[0] == full


def test_the_template_survives_save_and_load(chat_run: Path) -> None:
    assert load_tokenizer(chat_run).chat_template == CHAT_TEMPLATE
    assert '"chat_template"' in (chat_run / "tokenizer_config.json").read_text()


def test_a_tokenizer_saved_without_a_template_has_none(tmp_path: Path) -> None:
    GPT2Tokenizer().save(tmp_path)
    assert ChatFormat.of(load_tokenizer(tmp_path)) is None


def test_labels_keep_exactly_the_assistant_content_and_its_end_of_turn() -> None:
    tokenizer = GPT2Tokenizer()
    chat = ChatFormat(tokenizer)
    messages = parse_messages([
        {"role": "system", "content": "Add."}, {"role": "user", "content": "What is 38 + 47?"},
        {"role": "assistant", "content": "85"}, {"role": "user", "content": "And 1 + 2?"},
        {"role": "assistant", "content": "3 of course"},
    ])
    ids, labels = chat.training_ids(messages)
    assert len(ids) == len(labels)
    kept = [(i, t) for i, (t, label) in enumerate(zip(ids, labels)) if label != IGNORE]
    assert all(labels[i] == t for i, t in kept)
    answers = [tokenizer.encode("85") + [tokenizer.eos_id], tokenizer.encode("3 of course") + [tokenizer.eos_id]]
    assert [t for _, t in kept] == answers[0] + answers[1]
    assert len(kept) == len(answers[0]) + len(answers[1])
    # the kept tokens follow the assistant headers directly
    text = tokenizer.decode(ids)
    assert text.count(header("assistant")) == 2
    first = kept[0][0]
    assert tokenizer.decode(ids[:first]).endswith(header("assistant"))


@pytest.mark.parametrize("raw, fragment", [
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user"}], "content must be a string"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "a <|endoftext|> b"}], "must not contain"),
])
def test_bad_messages_are_refused_in_one_line(raw: object, fragment: str) -> None:
    with pytest.raises(GptlabError, match=fragment.replace("(", r"\(").replace("|", r"\|")):
        parse_messages(raw)


def test_empty_assistant_turns_and_conversations_without_one_are_refused() -> None:
    chat = ChatFormat(GPT2Tokenizer())
    with pytest.raises(GptlabError, match="empty"):
        chat.training_ids(parse_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]))
    with pytest.raises(GptlabError, match="no assistant turn"):
        chat.training_ids(parse_messages([{"role": "user", "content": "x"}]))


def test_a_char_tokenizer_has_no_chat_format() -> None:
    with pytest.raises(GptlabError, match="no end-of-text token"):
        ChatFormat(CharTokenizer(list("ab")))


def test_text_parts_are_joined() -> None:
    assert parse_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
                          )[0].content == "ab"


def test_an_export_keeps_the_template_for_transformers(gptlab, chat_run: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    code, _, err = gptlab("export", str(chat_run), str(tmp_path / "export"))
    assert code == 0, err
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    ids = hf.apply_chat_template(CONVERSATIONS[1], tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == ChatFormat(GPT2Tokenizer()).prompt_ids(parse_messages(CONVERSATIONS[1]))
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "export")).vocab_size == 50257
