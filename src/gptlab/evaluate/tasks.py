"""`gptlab eval RUN --tasks hellaswag,...`: lm-evaluation-harness tasks on a gptlab model, through
lm-eval's own Python API (`simple_evaluate`), so the prompts, metrics and table are lm-eval's.

lm-eval is the optional `eval` extra: nothing here imports it until a task is asked for, and its
absence is one line naming the install command.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import GptlabError
from ..fileio import atomic_write_text, environment_errors
from ..inference.modes import eval_mode
from ..model import GPT
from ..tokenizers import Tokenizer

INSTALL = "pip install 'gptlab[eval]'"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise GptlabError(f"lm-evaluation-harness is not installed; install it with: {INSTALL}") from None


def parse_tasks(text: str) -> list[str]:
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    if not tasks:
        raise GptlabError("--tasks needs at least one task name, e.g. --tasks hellaswag,lambada_openai")
    return tasks


@dataclass
class TaskResults:
    """lm-eval's results dictionary (samples left out) and its rendering as lm-eval's tables."""

    raw: dict[str, Any]

    def table(self) -> str:
        from lm_eval.utils import make_table

        text = make_table(self.raw)
        if self.raw.get("groups"):
            text += "\n" + make_table(self.raw, "groups")
        return text

    def metrics(self) -> dict[str, float]:
        """Flat `task/metric` -> value, for metrics.jsonl and the report (stderr and aliases left out)."""
        flat = {}
        for task, values in self.raw["results"].items():
            for key, value in values.items():
                metric, _, _filter = key.partition(",")
                if isinstance(value, (int, float)) and "stderr" not in metric and metric not in ("alias", "sample_len"):
                    flat[f"{task}/{metric}"] = float(value)
        return flat

    def write(self, path: Path) -> Path:
        from lm_eval.utils import handle_non_serializable

        with environment_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.raw, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
        return path


def run_tasks(
    tasks: list[str],
    *,
    model_path: str | Path | None = None,
    model: GPT | None = None,
    tokenizer: Tokenizer | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    include_path: str | Path | None = None,
    bootstrap_iters: int = 100_000,
) -> TaskResults:
    """Evaluate a run directory (`model_path`) or an in-memory model and tokenizer on lm-eval tasks.

    `include_path` adds a directory of task YAML files to lm-eval's own tasks. Task names are checked
    before anything is loaded; lm-eval downloads a task's data set from the Hugging Face hub on first
    use (an offline machine gets one line, exit 3, from the CLI). `bootstrap_iters` (lm-eval's default)
    resamples for the standard errors of non-mean metrics such as perplexity, in a forked process pool.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .harness import GptlabLM

    manager = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise GptlabError(f"--include-path {include_path}: no such directory")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if manager is None or any(name not in manager.all_tasks for name in tasks):
        # lm-eval's own 14,000 task files take half a minute to index: only when they are needed
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise GptlabError(f"unknown lm-eval task(s): {', '.join(unknown)} (list them with: lm_eval ls tasks)")
    for name, value in (("--num-fewshot", num_fewshot), ("--limit", limit)):
        if value is not None and value < 0:
            raise GptlabError(f"{name} must not be negative, got {value}")
    # a model handed in (training's) goes back in the mode it came in: GptlabLM puts it in eval mode
    with contextlib.nullcontext() if model is None else eval_mode(model):
        lm = GptlabLM(pretrained=model_path, model=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
        raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, verbosity="WARNING",
                                      bootstrap_iters=bootstrap_iters)
    raw.pop("samples", None)
    return TaskResults(raw)


def results_path(model_path: str | Path, tasks: list[str]) -> Path:
    """Beside the run: RUN/lm_eval/TIMESTAMP-TASKS.json (a name that is not a directory: ./lm_eval/)."""
    directory = Path(model_path) if Path(model_path).is_dir() else Path.cwd()
    names = "_".join(tasks) if len(tasks) <= 3 else f"{'_'.join(tasks[:3])}_and_{len(tasks) - 3}_more"
    stem = directory / "lm_eval" / f"{time.strftime('%Y%m%d-%H%M%S')}-{names}"
    path, n = stem.with_suffix(".json"), 1
    while path.exists():  # never replace an earlier evaluation's results
        n += 1
        path = stem.with_name(f"{stem.name}-{n}.json")
    return path
