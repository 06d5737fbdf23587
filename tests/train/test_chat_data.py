"""Supervised fine-tuning on conversations: the three record shapes, the loss mask counted exactly, one
conversation a window, and bad conversations refused in one line (exit 2) before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.chat import CHAT_TEMPLATE, IGNORE
from gptlab.checkpoint import save_model
from gptlab.inference import load_pretrained
from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer
from gptlab.train import distributed
from gptlab.train.chat_data import ChatDataset
from helpers import one_line_error, snapshot, tiny_model

RECORDS = [
    {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "What is 38 + 47?"},
                  {"role": "assistant", "content": "85"}]},
    {"prompt": "What is 1 + 2?", "completion": "3"},
    {"instruction": "Add the numbers.", "input": "20 and 22", "output": "42, the answer"},
]
ANSWERS = ["85", "3", "42, the answer"]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-vocabulary model with random weights, saved with GPT-2's tokenizer and no chat template."""
    run = tmp_path_factory.mktemp("base") / "model"
    save_model(tiny_model(vocab_size=50257, block_size=64), run)
    GPT2Tokenizer().save(run)
    return run


def test_the_loss_mask_keeps_exactly_each_answer_and_its_end_of_turn(tmp_path: Path) -> None:
    tokenizer = GPT2Tokenizer()
    data = ChatDataset(write_jsonl(tmp_path / "c.jsonl", RECORDS), tokenizer, block_size=64)
    assert len(data.split("train")) == 3  # fewer than ten: the validation loss is on the same ones
    x, y = data.get_batch("train", 16, 64, np.random.default_rng(0))
    assert x.shape == y.shape
    for row in range(16):
        kept = y[row][y[row] != IGNORE].tolist()
        answer = next(a for a in ANSWERS if kept == tokenizer.encode(a) + [tokenizer.eos_id])
        assert len(kept) == len(tokenizer.encode(answer)) + 1
        # the targets are the next inputs wherever they are kept (one conversation per row, shifted by one)
        where = torch.nonzero(y[row] != IGNORE).flatten()
        assert all(int(x[row, i + 1]) == int(y[row, i]) for i in where.tolist() if i + 1 < x.shape[1])
        # the padding after a conversation is never a target
        ends = (y[row] == tokenizer.eos_id).nonzero().flatten()
        assert (y[row, int(ends[-1]) + 1:] == IGNORE).all()


def test_prompt_completion_and_alpaca_records_become_user_and_assistant_turns(tmp_path: Path) -> None:
    tokenizer = GPT2Tokenizer()
    data = ChatDataset(write_jsonl(tmp_path / "c.jsonl", RECORDS), tokenizer, block_size=64)
    texts = [tokenizer.decode(ids) for ids, _ in data.split("train")]
    assert texts[1] == "<|endoftext|><|user|>\nWhat is 1 + 2?<|endoftext|><|assistant|>\n3<|endoftext|>"
    assert texts[2].startswith("<|endoftext|><|user|>\nAdd the numbers.\n\n20 and 22<|endoftext|><|assistant|>\n")


def test_every_tenth_conversation_is_held_out(tmp_path: Path) -> None:
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    data = ChatDataset(write_jsonl(tmp_path / "c.jsonl", records), GPT2Tokenizer(), block_size=64)
    assert (len(data.split("train")), len(data.split("val"))) == (18, 2)


def test_chat_tuning_trains_the_assistant_tokens_and_saves_the_template(
        gptlab, base_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", RECORDS * 4)
    out = tmp_path / "tuned"
    code, _, err = gptlab("train", "--init-from", str(base_model), "--task", "chat", "--data", str(data),
                          "--out", str(out), "--max-iters", "3", "--eval-interval", "0", "--eval-iters", "1",
                          "--batch-size", "2", "--block-size", "64", "--sample-tokens", "0", "--no-progress")
    assert code == 0, err
    assert load_tokenizer(out).chat_template == CHAT_TEMPLATE
    model, tokenizer = load_pretrained(out)
    assert model.config.vocab_size == 50257 and tokenizer.chat_template == CHAT_TEMPLATE
    assert "assistant's tokens" in (out / "report.md").read_text()


def test_a_hugging_face_dataset_of_conversations_tunes_as_its_json_lines_do(
        gptlab, base_model: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="--hf-dataset needs the datasets library (gptlab[datasets])")
    records = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                             {"role": "assistant", "content": str(i + 1)}]} for i in range(12)]
    saved = tmp_path / "hf"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    datasets.Dataset.from_list([{"messages": [{"role": "robot", "content": "x"}]}]).save_to_disk(str(tmp_path / "bad"))
    tokenizer = GPT2Tokenizer()
    from_file = ChatDataset(write_jsonl(tmp_path / "c.jsonl", records), tokenizer, block_size=64)
    from_hub_format = ChatDataset("", tokenizer, block_size=64, hf_dataset=str(saved))
    for split in ("train", "val"):
        assert from_hub_format.split(split) == from_file.split(split)
    out = tmp_path / "tuned"
    code, _, err = gptlab("train", "--init-from", str(base_model), "--task", "chat", "--hf-dataset", str(saved),
                          "--out", str(out), "--max-iters", "2", "--eval-interval", "0", "--eval-iters", "1",
                          "--batch-size", "2", "--block-size", "64", "--sample-tokens", "0", "--no-progress")
    assert code == 0, err
    assert load_tokenizer(out).chat_template == CHAT_TEMPLATE
    code, _, err = gptlab("train", "--init-from", str(base_model), "--task", "chat", "--hf-dataset",
                          str(tmp_path / "bad"), "--out", str(tmp_path / "run"), "--no-progress")
    one_line_error(code, err, 2, "bad[0]: messages[0]: unknown role 'robot'")
    code, _, err = gptlab("train", "--hf-dataset", str(saved), "--out", str(tmp_path / "run"), "--no-progress")
    one_line_error(code, err, 2, "--hf-dataset is for --task chat")


@pytest.mark.parametrize("records, fragment", [
    ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     "c.jsonl:1: messages[0]: unknown role 'robot'"),
    ([RECORDS[1], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
     "c.jsonl:2: an assistant turn is empty"),
    ([{"prompt": "word " * 80, "completion": "x"}], "longer than the context"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
    (["not json"], "c.jsonl:1: not JSON"),
    ([{"text": "hi"}], "expected messages, prompt/completion or instruction/output"),
    ([], "no conversations"),
])
def test_bad_conversations_are_one_line_and_exit_2_before_anything_is_written(
        gptlab, base_model: Path, tmp_path: Path, records: list, fragment: str) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", records)
    before = snapshot(tmp_path)
    code, _, err = gptlab("train", "--init-from", str(base_model), "--task", "chat", "--data", str(data),
                          "--out", str(tmp_path / "run"), "--block-size", "64", "--max-iters", "1", "--no-progress")
    one_line_error(code, err, 2, fragment)
    assert snapshot(tmp_path) == before


def test_a_char_model_cannot_be_chat_tuned(gptlab, tiny_run: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    code, _, err = gptlab("train", "--init-from", str(tiny_run), "--task", "chat", "--data", str(data),
                          "--out", str(tmp_path / "run"), "--max-iters", "1", "--no-progress")
    one_line_error(code, err, 2, "no end-of-text token")


def test_a_chat_run_resumes_and_trains_in_bfloat16(gptlab, base_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", RECORDS * 4)
    out = tmp_path / "tuned"
    common = ["--no-progress", "--sample-tokens", "0", "--eval-iters", "1"]
    code, _, err = gptlab("train", "--init-from", str(base_model), "--task", "chat", "--data", str(data),
                          "--out", str(out), "--max-iters", "2", "--eval-interval", "2", "--batch-size", "2",
                          "--block-size", "64", "--dtype", "bfloat16", *common)
    assert code == 0, err
    code, _, err = gptlab("train", "--out", str(out), "--resume", "--max-iters", "4", *common)
    assert code == 0, err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["task"], saved["dtype"], saved["data"]) == ("chat", "bfloat16", str(data.resolve()))
    assert load_tokenizer(out).chat_template == CHAT_TEMPLATE
    assert json.loads((out / "report.json").read_text())["steps"] == 4


def test_chat_tuning_with_lora_keeps_the_template(gptlab, base_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", RECORDS * 4)
    out = tmp_path / "adapter"
    code, _, err = gptlab("train", "--init-from", str(base_model), "--task", "chat", "--data", str(data),
                          "--out", str(out), "--max-iters", "2", "--eval-interval", "0", "--eval-iters", "1",
                          "--batch-size", "2", "--block-size", "64", "--sample-tokens", "0", "--lora-rank", "4",
                          "--no-progress")
    assert code == 0, err
    model, tokenizer = load_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.slow
def test_two_processes_tune_as_one_does(base_model: Path, tmp_path: Path) -> None:
    """DDP over conversations: each process pads its own rows, which changes no loss (padding is never a
    target and comes after every real token), so 2 processes log what 1 process does with the same batch."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"q{i} " * (i % 5 + 1), "completion": f"a{i}"}
                                              for i in range(30)])
    clean = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    common = ["train", "--init-from", str(base_model), "--task", "chat", "--data", str(data), "--block-size", "64",
              "--batch-size", "2", "--grad-accum", "2", "--max-iters", "4", "--eval-interval", "2", "--eval-iters",
              "2", "--log-interval", "1", "--sample-tokens", "0", "--dropout", "0", "--no-progress"]
    losses = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        done = subprocess.run([sys.executable, "-m", "gptlab", *common, "--out", str(out), "--nproc", str(nproc)],
                              env={**clean, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[nproc] = [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]
    assert [row[0] for row in losses[2]] == [row[0] for row in losses[1]]
    assert sum(a is not None for _, a, _ in losses[1]) == 4 and sum(v is not None for *_, v in losses[1]) == 2
    for (_, a, va), (_, b, vb) in zip(losses[2], losses[1]):
        assert (a is None) == (b is None) and (va is None) == (vb is None)
        assert a is None or a == pytest.approx(b, abs=1e-5)
        assert va is None or va == pytest.approx(vb, abs=1e-5)
