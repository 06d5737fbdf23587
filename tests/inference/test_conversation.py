"""`gptlab chat`: each line piped in is the user's next message, each reply the model's continuation of the
whole conversation through the chat template, ending at the end of the turn."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.chat import CHAT_TEMPLATE, ChatFormat, Message
from gptlab.checkpoint import load_model, save_model
from gptlab.inference import SamplingParams, complete
from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer
from helpers import child_env, one_line_error, tiny_model


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("chat") / "run"
    save_model(tiny_model(vocab_size=50257, block_size=64, seed=3), run)
    tokenizer = GPT2Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save(run)
    return run


def expected_replies(run: Path, lines: list[str], system: str, max_new_tokens: int) -> list[str]:
    """Each turn's reply computed directly: the template's prompt of the conversation so far, continued."""
    model, tokenizer = load_model(run).eval(), load_tokenizer(run)
    chat = ChatFormat.of(tokenizer)
    conversation, replies = ([Message("system", system)] if system else []), []
    for line in lines:
        conversation.append(Message("user", line))
        ids = chat.prompt_ids(conversation)
        reply = complete(model, tokenizer, [ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0))[0]
        replies.append(reply.text)
        conversation.append(Message("assistant", reply.text))
    return replies


def test_piped_lines_are_a_conversation(gptlab, chat_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = ["What is 38 + 47?", "And 1 + 1?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code, out, err = gptlab("chat", str(chat_run), "--system", "You add.", "--temperature", "0",
                            "--max-new-tokens", "6", "--device", "cpu")
    assert code == 0, err
    replies = expected_replies(chat_run, lines, "You add.", 6)
    assert out == "".join(reply + "\n" for reply in replies)


def test_a_run_without_a_chat_template_is_one_line_exit_2(gptlab, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    save_model(tiny_model(vocab_size=50257, block_size=64), tmp_path)
    GPT2Tokenizer().save(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, _, err = gptlab("chat", str(tmp_path), "--device", "cpu")
    one_line_error(code, err, 2, "no chat template", "--task chat")


@pytest.mark.slow
def test_gptlab_chat_reads_a_pipe(chat_run: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gptlab", "chat", str(chat_run), "--temperature", "0",
                           "--max-new-tokens", "4", "--device", "cpu"], input="Hello\n", capture_output=True,
                          text=True, env=child_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_replies(chat_run, ["Hello"], "", 4)[0] + "\n"
