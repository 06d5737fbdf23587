"""Data flows one way: cli -> serve/train/evaluate -> inference -> model, data, tokenizers -> config.

Every module's imports are read from its source (ast: imports inside functions and under TYPE_CHECKING
count, and so do the lazy `_EXPORTS` tables of `gptlab.lazy`), and each must go to a room on a lower
floor or stay in its own room. A room is a top-level module or subpackage of gptlab; a new one fails
here until it is given a floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gptlab"

# The floors, top to bottom. "__init__" is the package's public API (gptlab/__init__.py).
FLOORS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"__init__"},
    {"serve", "train", "evaluate", "attention_maps", "gguf_export"},
    {"inference"},
    {"checkpoint"},  # the disk format, which inference's loader reads
    {"lora"},  # LoRA adapters on a model: checkpoint reads and writes them
    {"heads"},  # GPT-1's task heads on a model: LoRA trains them beside its adapters, checkpoint saves them
    {"model", "data", "quantize", "chat"},  # quantize: a transform of a model's weights; chat: the template over a tokenizer
    {"tokenizers", "kernels", "throughput", "threads", "precision", "device"},
    {"config", "bpe"},  # bpe: the textbook algorithm, imports nothing of gptlab
    {"fileio", "lazy"},
    {"errors"},
]
# Imports between two rooms of one floor, allowed in this direction only, and why.
SIDEWAYS = {
    ("train", "evaluate"): "training scores its model with evaluate's scorer, report and lm-eval runner; "
                           "evaluate knows nothing of training",
}
# Violations known and owned by other work, each with what removes it. One that no longer happens
# fails the test too, so that the table shrinks as they go.
KNOWN: dict[tuple[str, str], str] = {}


def floor_of(room: str) -> int | None:
    return next((i for i, rooms in enumerate(FLOORS) if room in rooms), None)


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    """The room of `gptlab.X...` is X; gptlab itself is "__init__", its public API."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, package: Path) -> set[str]:
    """The gptlab modules `path` imports, as absolute names (`from P import X` names P.X where X is a
    module of P)."""
    name = module_name(path, package)
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = here.split(".")[: len(here.split(".")) - level + 1]
        return ".".join(base + ([module] if module else []))

    def add(target: str, names: list[str]) -> None:
        if target.split(".")[0] != package.name:
            return
        inside = package.parent.joinpath(*target.split("."))
        submodules = [n for n in names if (inside / f"{n}.py").is_file() or (inside / n / "__init__.py").is_file()]
        found.update([f"{target}.{n}" for n in submodules] or [target])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            add(resolve(node.module, node.level), [alias.name for alias in node.names])
        elif (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
              and isinstance(node.value, ast.Dict)):
            for value in node.value.values:  # lazy_attributes' table: name -> relative module
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    relative = value.value
                    level = len(relative) - len(relative.lstrip("."))
                    add(resolve(relative.lstrip(".") or None, level), [])
    return found


def violations(package: Path, known: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Each import that goes up, sideways without leave or into a room with no floor, as one line; and
    each known exception that no longer happens."""
    known = KNOWN if known is None else known
    found, seen_known = [], set()
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        source = room_of(module)
        for target in sorted(imported_modules(path, package)):
            room = room_of(target)
            if room == source:
                continue
            if (module, room) in known:
                seen_known.add((module, room))
                continue
            up, down = floor_of(source), floor_of(room)
            if up is None or down is None:
                missing = source if up is None else room
                found.append(f"{module} -> {target}: the room {missing!r} has no floor in FLOORS")
            elif down < up:
                found.append(f"{module} -> {target}: imports upwards ({source} sits below {room})")
            elif down == up and (source, room) not in SIDEWAYS:
                found.append(f"{module} -> {target}: imports sideways ({source} and {room} share a floor)")
    found += [f"{module} -> {room}: the known exception no longer happens; remove it from KNOWN"
              for module, room in sorted(set(known) - seen_known)]
    return found


def test_every_import_goes_down_or_stays_in_its_room() -> None:
    assert violations(PACKAGE) == []


def test_every_room_has_a_floor() -> None:
    rooms = {room_of(module_name(path, PACKAGE)) for path in PACKAGE.rglob("*.py")}
    assert sorted(room for room in rooms if floor_of(room) is None) == []


def fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "gptlab"
    for name, text in {"__init__.py": "", "train/__init__.py": "", "serve/__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


@pytest.mark.parametrize("files, expected", [
    ({"model.py": "from .train.loop import Loop\n"}, "gptlab.model -> gptlab.train.loop: imports upwards"),
    ({"model.py": "def f():\n    from gptlab import train\n"}, "gptlab.model -> gptlab.train: imports upwards"),
    ({"config.py": "_EXPORTS = {'Server': '.serve.app'}\n"}, "gptlab.config -> gptlab.serve.app: imports upwards"),
    ({"serve/runner.py": "from ..train.device import resolve_device\n"},
     "gptlab.serve.runner -> gptlab.train.device: imports sideways"),
    ({"evaluate/tasks.py": "from ..train import config\n"}, "gptlab.evaluate.tasks -> gptlab.train: imports sideways"),
    ({"checkpoint.py": "from .inference import generate\n"}, "gptlab.checkpoint -> gptlab.inference: imports upwards"),
    ({"train/run.py": "from ..attic import old\n"}, "gptlab.train.run -> gptlab.attic: the room 'attic' has no floor"),
])
def test_a_bad_import_is_caught(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    """The control: each of these imports, planted in a package of its own, is reported."""
    package = fake_package(tmp_path, {"evaluate/__init__.py": "", "attic.py": "", "inference/__init__.py": "", **files})
    found = violations(package, known={})
    assert len(found) == 1 and found[0].startswith(expected), found


def test_downward_and_allowed_sideways_imports_pass(tmp_path: Path) -> None:
    package = fake_package(tmp_path, {
        "evaluate/__init__.py": "", "device.py": "from .errors import GptlabError\n", "errors.py": "",
        "train/loop.py": "from ..evaluate import scorer\nfrom ..device import DTYPES\nfrom . import state\n",
        "train/state.py": "", "evaluate/scorer.py": "",
    })
    assert violations(package, known={}) == []


def test_a_known_exception_that_no_longer_happens_is_reported(tmp_path: Path) -> None:
    package = fake_package(tmp_path, {"evaluate/__init__.py": ""})
    assert violations(package, known={("gptlab.evaluate.harness", "generation"): "gone"}) == [
        "gptlab.evaluate.harness -> generation: the known exception no longer happens; remove it from KNOWN"]
