"""The documentation tells the truth about the code: every command, option, link, path and API name shown
in README.md, docs/*.md and benchmarks/README.md exists, and the README's benchmark summary is what
benchmarks/readme_table.py writes from the results files now.

Data-driven: a new guide in docs/ is checked without touching this file. Commands are checked against the
parsers `gptlab --help` prints (built in-process, no subprocess), so the check costs well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from gptlab.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
IDS = [str(p.relative_to(ROOT)) for p in DOCS]
README_MAX_LINES = 250
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")  # a span may wrap onto the next line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# `gptlab CMD`, `.venv/bin/gptlab CMD`, `python -m gptlab CMD`, `torchrun ... -m gptlab CMD`; not
# `python -m gptlab.evaluate...` nor `lm_eval --model gptlab --model_args ...` (no command word follows).
INVOCATION = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?gptlab[ \t]+([a-z][\w-]*)")
OPTION = re.compile(r"^--[a-z][\w-]*")
REPO_PATH = re.compile(r"^(?:src|tests|benchmarks|docs)/[\w./-]*$")
PLACEHOLDER = re.compile(r"[A-Z]{3,}")  # benchmarks/results/NAME.md names no one file
API_NAME = re.compile(r"^gptlab(?:\.\w+)+$")


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (inline code spans are read from here)."""
    return FENCE.sub("", text)


def _spans(doc: Path) -> list[str]:
    """The document's inline code spans, a span wrapped over two lines read as one line."""
    return [" ".join(span.split()) for span in INLINE.findall(_prose(_text(doc)))]


@cache
def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """A command's options, its actions' included (`gptlab tokenizer train --vocab-size`)."""
    found = {s for action in parser._actions for s in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = found.union(*(_options(sub) for sub in action.choices.values()))
    return found


def _shell_commands(doc: Path) -> list[str]:
    """Every shell line of the document's shell blocks (continuations joined, comments cut) and every
    inline code span, as command lines."""
    lines = []
    for lang, body in FENCE.findall(_text(doc)):
        if lang not in SHELL_LANGS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            lines.append(re.sub(r"(^|\s)#.*$", "", line))
    lines += _spans(doc)
    return lines


def _invocations(doc: Path) -> list[tuple[str, list[str]]]:
    """(command, options) of every `gptlab COMMAND ...` the document shows."""
    found = []
    for line in _shell_commands(doc):
        for match in INVOCATION.finditer(line):
            rest = re.split(r"\s(?:\||&&|;|>)\s", line[match.end():])[0]
            try:
                words = shlex.split(rest)
            except ValueError:  # an unbalanced quote in prose: read the words as they stand
                words = rest.split()
            found.append((match.group(1), [OPTION.match(w).group(0) for w in words if OPTION.match(w)]))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_gptlab_command_and_option_shown_exists(doc: Path) -> None:
    parsers = _parsers()
    wrong = []
    for command, options in _invocations(doc):
        if command not in parsers:
            wrong.append(f"gptlab {command}: no such command (known: {', '.join(parsers)})")
            continue
        wrong += [f"gptlab {command} {o}: no such option" for o in options if o not in _options(parsers[command])]
    assert not wrong, f"{doc.name}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_option_named_alone_belongs_to_some_gptlab_command(doc: Path) -> None:
    """A span like `--max-time S` outside a command line names an option of one of the commands."""
    known = set().union(*(_options(p) for p in _parsers().values()))
    named = {OPTION.match(span).group(0) for span in _spans(doc) if OPTION.match(span)}
    assert not named - known, f"{doc.name}: options no gptlab command has: {sorted(named - known)}"


def test_the_docs_show_commands_at_all() -> None:
    """The checks above read something: the README shows every command gptlab has."""
    shown = {command for command, _ in _invocations(ROOT / "README.md")}
    assert shown == set(_parsers())


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _prose(_text(doc)), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_relative_link_and_image_resolves(doc: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(_text(doc))):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{doc.name}:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_repository_path_named_exists(doc: Path) -> None:
    """`src/...`, `tests/...`, `benchmarks/...` and `docs/...` in code spans name files that are there."""
    spans = _spans(doc)
    missing = [s for s in spans if REPO_PATH.match(s) and not PLACEHOLDER.search(s) and not (ROOT / s).exists()]
    assert not missing, f"{doc.name}: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_gptlab_api_name_shown_imports(doc: Path) -> None:
    """`gptlab.inference.SamplingParams`, `gptlab.throughput.matmul_peak`, ...: a module, or a name in one."""
    missing = []
    for name in sorted({s for s in _spans(doc) if API_NAME.match(s)}):
        module, attribute = name, []
        while module:
            try:
                obj = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, _, last = module.rpartition(".")
                attribute.insert(0, last)
        try:
            for part in attribute:
                obj = getattr(obj, part)
        except AttributeError:
            missing.append(name)
    assert not missing, f"{doc.name}: {missing}"


def test_readme_stays_short() -> None:
    lines = _text(ROOT / "README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the details belong in docs/"


def _readme_table():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_benchmark_summary_is_generated_from_the_results() -> None:
    """One source of truth: the README's block is exactly what the script writes from results/*.json."""
    table = _readme_table()
    readme = _text(ROOT / "README.md")
    assert table.replace_block(readme, table.render()) == readme, \
        "README.md's benchmark summary is stale: run .venv/bin/python benchmarks/readme_table.py"


def test_readme_benchmark_summary_names_each_rows_machine(tmp_path: Path) -> None:
    """Each row carries its results file's machine, and a file that is absent leaves its row out."""
    table = _readme_table()
    results = ROOT / "benchmarks" / "results"
    for name in ("demo_load", "adder"):
        data = json.loads((results / f"{name}.json").read_text())
        data["machine"] = f"Test CPU {name}, 1 core"
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    block = table.render(tmp_path)
    rows = [line for line in block.splitlines() if line.startswith("| ") and line.split(" | ")[1] not in ("headline", "---")]
    assert [r.split(" | ")[-1] for r in rows] == ["[demo_load.md](benchmarks/results/demo_load.md) |",
                                                 "[adder.md](benchmarks/results/adder.md) |"]
    assert [r.split(" | ")[2] for r in rows] == ["A", "B"]
    assert "A: Test CPU demo_load, 1 core." in block and "B: Test CPU adder, 1 core." in block


def test_readme_layout_names_every_part_of_the_package() -> None:
    """The layout block lists each module and package of src/gptlab, and nothing that is gone."""
    readme = _text(ROOT / "README.md")
    block = re.search(r"^```\nsrc/gptlab/\n(.*?)^```", readme, re.M | re.S).group(1)
    listed = set(re.findall(r"^  (\S+)", block, re.M))
    present = {p.name + ("/" if p.is_dir() else "") for p in (ROOT / "src" / "gptlab").iterdir()
               if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py")}
    assert listed == present, f"missing from the layout: {sorted(present - listed)}; gone: {sorted(listed - present)}"


def test_benchmarks_readme_indexes_every_result_with_its_machine() -> None:
    index = _text(ROOT / "benchmarks" / "README.md")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| \[(\w+)\.md\]\(results/\1\.md\) \|.*$", index, re.M)}
    results = ROOT / "benchmarks" / "results"
    for result in sorted(results.glob("*.json")):
        assert result.stem in rows, f"benchmarks/README.md has no row for results/{result.stem}.md"
        machine = json.loads(result.read_text())["machine"]
        cpu = machine.split(",")[0].replace("(R)", "").replace(" Processor", "").strip()
        assert cpu in rows[result.stem].split(" | ")[-1], f"{result.stem}: made on {machine!r}"
