"""The local lm-eval tasks and the one comparison both lm-eval proofs make (gptlab's lm-eval model in
test_harness.py, lm-eval's `local-completions` against `gptlab serve` in test_server.py): every
document's answer and every task metric equal to lm-eval's `hf` model on the same run, within 1e-4."""

from __future__ import annotations

import pytest

from helpers import REPO

TASKS_DIR = REPO / "tests" / "lm_eval_tasks"
TASKS = ["gptlab_mc", "gptlab_last_word", "gptlab_rolling", "gptlab_gen"]


def evaluate(model: str, model_args: str, **kwargs) -> dict:
    """lm-eval's simple_evaluate on the local tasks, offline, every document's answer logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=manager,
                                   batch_size=4, device="cpu", log_samples=True, verbosity="WARNING", **kwargs)


def answers(results: dict) -> dict[tuple[str, int], list]:
    """Each (task, document) -> the model's answers to its requests, as lm-eval recorded them."""
    return {(task, sample["doc_id"]): sample["filtered_resps"]
            for task, samples in results["samples"].items() for sample in samples}


def assert_same_scores(ours: dict, theirs: dict) -> None:
    mine, reference = answers(ours), answers(theirs)
    assert mine.keys() == reference.keys() and {task for task, _ in mine} == set(TASKS)
    for key, got in mine.items():
        for a, b in zip(got, reference[key], strict=True):
            if key[0] == "gptlab_gen":
                assert a == b, key  # greedy text, cut at the stop string
            elif key[0] == "gptlab_rolling":
                assert a == pytest.approx(b, abs=1e-4), key  # ln P(document)
            else:  # (ln P(continuation | context), is_greedy)
                assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1], key
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert value == pytest.approx(theirs["results"][task][metric], rel=1e-4, abs=1e-4), (task, metric)
