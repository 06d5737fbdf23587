"""The task models' inputs and Python API (gptlab.inference.classify) and the labelled data readers
(gptlab.data.labeled): how texts and choices become ids, what is cut, batching that changes nothing, and
where --data's examples and labels come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.config import GPTConfig
from gptlab.data import labeled
from gptlab.data.labeled import label_order, read_split, read_splits
from gptlab.errors import GptlabError
from gptlab.heads import SequenceClassifier
from gptlab.inference.classify import (DELIMITER, Classifier, encode_choice, encode_text, evaluate_task,
                                       load_classifier, pad_id)
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer
from gptlab.train.labeled_data import LabeledDataset

CHARS = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz .,\n")))


def test_a_long_text_keeps_its_end() -> None:
    ids, cut = encode_text(CHARS, "abcdefgh", 5)
    assert CHARS.decode(ids) == "defgh" and cut
    ids, cut = encode_text(CHARS, "abc", 5)
    assert CHARS.decode(ids) == "abc" and not cut
    with pytest.raises(GptlabError, match="the text is empty"):
        encode_text(CHARS, "", 5)
    with pytest.raises(GptlabError, match="text 3: character '!'"):
        encode_text(CHARS, "hi!", 5, "text 3")


def test_a_choice_is_context_delimiter_choice_and_the_extract_token() -> None:
    tokenizer = GPT2Tokenizer()
    ids, cut = encode_choice(tokenizer, "The cat sat", " on the mat", 32)
    expected = tokenizer.encode("The cat sat") + tokenizer.encode(DELIMITER) + tokenizer.encode(" on the mat")
    assert ids == expected + [tokenizer.eos_id] and not cut  # GPT-2's end-of-text is the extract token
    long_context = " ".join(["word"] * 50)
    ids, cut = encode_choice(tokenizer, long_context, " yes", 16)
    assert cut and len(ids) == 16 and ids[-3:] == tokenizer.encode(DELIMITER + " yes")[-2:] + [tokenizer.eos_id]
    assert pad_id(CHARS) == CHARS.encode("\n")[0]  # no end-of-text in a character vocabulary: a newline


@pytest.fixture
def char_classifier(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=CHARS.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = SequenceClassifier(config, ("a", "b", "c"), pad_id(CHARS))
    save_model(model, tmp_path / "run")
    CHARS.save(tmp_path / "run")
    return tmp_path / "run"


def test_batched_predictions_equal_one_text_at_a_time(char_classifier: Path) -> None:
    classifier = load_classifier(char_classifier)
    texts = ["a cat", "the long dog ran far away over the hills", "b", "c c c.\n"]
    together = classifier.predict(texts)
    alone = torch.cat([classifier.predict([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(together.sum(-1), torch.ones(4))
    # a trailing newline is padding to a character classifier: the same token is read
    torch.testing.assert_close(classifier.predict(["c c c."]), classifier.predict(["c c c.\n"]))
    assert together.shape == (4, 3) and (together[0] - together[1]).abs().max() > 1e-4


def test_a_classifier_without_a_pad_id_reads_each_text_alone(char_classifier: Path) -> None:
    classifier = load_classifier(char_classifier)
    unpadded = Classifier(classifier.model, classifier.tokenizer)
    unpadded.model.pad_token_id = None  # as a Hugging Face classifier saved without one
    texts = ["a cat", "the dog"]
    torch.testing.assert_close(unpadded.predict(texts), torch.cat([unpadded.predict([t]) for t in texts]))


def test_evaluate_counts_a_confusion_table(char_classifier: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": t, "label": lab} for t, lab in [("a cat", "a"), ("the dog", "b"), ("c", "c"), ("b b", "b")]]
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_task(char_classifier, str(data), "val")
    predicted = load_classifier(char_classifier).predict([r["text"] for r in rows]).argmax(-1).tolist()
    expected = [[0] * 3 for _ in range(3)]
    for row, guess in zip(rows, predicted):
        expected[("a", "b", "c").index(row["label"])][guess] += 1
    assert result.count == 4 and result.confusion == expected
    assert result.correct == sum(("a", "b", "c")[g] == r["label"] for g, r in zip(predicted, rows))
    with pytest.raises(GptlabError, match="no train.jsonl or train.csv"):
        evaluate_task(char_classifier, str(data), "train")


# --- data sources ----------------------------------------------------------------------------------


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_one_file_holds_every_tenth_example_out(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "x" if i % 2 else "y"} for i in range(25)]
    splits, how = read_splits(str(write(tmp_path / "d.jsonl", rows)), "classify", 64)
    assert [t for t, _ in splits["val"]] == ["t9", "t19"] and len(splits["train"]) == 23
    assert "every 10th example" in how
    examples, _ = read_split(str(tmp_path / "d.jsonl"), "classify", "val", 64)
    assert len(examples) == 25  # eval scores a single file whole


def test_a_built_in_task_is_one_entry_of_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    splits = {"train": [("merry jest", "comedy"), ("a king dies", "history")], "val": [("woe", "tragedy")]}
    monkeypatch.setitem(labeled.BUILTIN, "toy-kinds", lambda context: splits)
    got, how = read_splits("toy-kinds", "classify", 64)
    assert got == splits and "built-in" in how
    assert read_split("toy-kinds", "classify", "val", 64)[0] == [("woe", "tragedy")]


def test_labels_sort_integers_by_value_then_names() -> None:
    assert label_order({"10", "2", "1"}) == ["1", "2", "10"]
    assert label_order({"b", "a", "3"}) == ["3", "a", "b"]


def test_choices_of_different_counts_are_refused(tmp_path: Path) -> None:
    rows = [{"context": "c", "choices": ["a", "b"] + (["c"] if i == 4 else []), "label": 0} for i in range(12)]
    with pytest.raises(GptlabError, match="examples have 2 and 3 choices"):
        LabeledDataset(str(write(tmp_path / "c.jsonl", rows)), "choice", GPT2Tokenizer(), 32)


def test_csv_without_a_label_column_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,kind\nhello,a\n")
    with pytest.raises(GptlabError, match="no label column"):
        read_splits(str(tmp_path / "d.csv"), "classify", 64)
