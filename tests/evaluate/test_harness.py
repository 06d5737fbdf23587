"""gptlab as an lm-eval model: the same scores as lm-eval's `hf` model on the same run, offline.

The tasks are the local ones in tests/lm_eval_tasks (a multiple-choice, a last-word, a rolling
perplexity and a generation task, data in the repository): no network, no Hugging Face hub.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY_RUN
from lm_eval_reference import TASKS, TASKS_DIR, answers, assert_same_scores, evaluate

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra: pip install 'gptlab[eval]'")

from lm_eval.tasks import TaskManager  # noqa: E402

from gptlab.evaluate.tasks import run_tasks  # noqa: E402
from gptlab.tokenizers import load_tokenizer  # noqa: E402
from gptlab.train import build_train_config, train  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture(scope="module")
def gpt2_run(gpt2_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained with GPT-2's tokenizer (a few steps, context 64): a directory `hf` can load too."""
    out = tmp_path_factory.mktemp("runs") / "gpt2-tiny"
    overrides = dict(TINY_RUN, data=str(gpt2_data), out=str(out), block_size=64, max_iters=10, eval_interval=10)
    train(build_train_config(overrides=overrides), show_progress=False)
    return out


@pytest.mark.slow
def test_every_request_type_scores_as_the_hf_model_does(gpt2_run: Path) -> None:
    import gptlab.evaluate.harness  # noqa: F401  (registers --model gptlab)

    args = f"pretrained={gpt2_run},dtype=float32"
    ours, theirs = evaluate("gptlab", args), evaluate("hf", args)
    assert_same_scores(ours, theirs)
    lls = [got[0][0] for (task, _), got in answers(ours).items() if task == "gptlab_mc"]
    assert len(set(lls)) == len(lls) and max(lls) < 0  # distinct scores per document: nothing trivially equal


@pytest.mark.slow
def test_a_character_level_run_gets_scores(tiny_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    results = run_tasks(TASKS, model_path=tiny_run, include_path=TASKS_DIR, batch_size=3)
    metrics = results.metrics()
    assert 0 <= metrics["gptlab_mc/acc"] <= 1 and 0 <= metrics["gptlab_gen/exact_match"] <= 1
    # a 65-character model read on text it mostly knows: far better than uniform (log2 of its vocabulary)
    assert 0 < metrics["gptlab_rolling/bits_per_byte"] < math.log2(load_tokenizer(tiny_run).vocab_size)
    assert all(math.isfinite(value) for value in metrics.values())
    assert "characters outside the model's vocabulary were left out" in caplog.text  # digits, a semicolon...
    assert "gptlab_rolling" in results.table() and "bits_per_byte" in results.table()


def test_a_model_handed_in_training_mode_is_given_back_in_training_mode(tiny_run: Path) -> None:
    """Training's task scores: the model is scored without dropout, then trains on with it."""
    from gptlab import load_model

    model = load_model(tiny_run).train()
    run_tasks(["gptlab_mc"], model=model, tokenizer=load_tokenizer(tiny_run), include_path=TASKS_DIR,
              limit=2, batch_size=3)
    assert model.training and all(module.training for module in model.modules())


@pytest.mark.slow
def test_cli_prints_lm_eval_table_and_writes_results_beside_the_run(gpt2_run: Path, gptlab) -> None:
    code, out, err = gptlab("eval", str(gpt2_run), "--tasks", "gptlab_mc,gptlab_gen", "--include-path",
                            str(TASKS_DIR), "--limit", "3", "--batch-size", "2")
    assert code == 0, err
    assert "|gptlab_mc" in out.replace(" ", "") and "acc" in out and "exact_match" in out
    written = Path(out.strip().splitlines()[-1].removeprefix("results: "))
    assert written.parent == gpt2_run / "lm_eval" and written.name.endswith("gptlab_mc_gptlab_gen.json")
    saved = json.loads(written.read_text())
    assert set(saved["results"]) == {"gptlab_mc", "gptlab_gen"} and saved["config"]["limit"] == 3
    code, out, _ = gptlab("eval", str(gpt2_run), "--tasks", "gptlab_mc", "--include-path", str(TASKS_DIR), "--limit", "3")
    second = Path(out.strip().splitlines()[-1].removeprefix("results: "))
    assert code == 0 and second != written and written.is_file()  # an earlier result is never replaced


@pytest.mark.slow
def test_task_mode_usage_errors(gpt2_run: Path, gptlab, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = gptlab("eval", str(gpt2_run), "--tasks", "no_such_task", "--include-path", str(TASKS_DIR))
    assert code == 2 and "unknown lm-eval task(s): no_such_task" in err and len(err.strip().splitlines()) == 1
    code, _, err = gptlab("eval", str(gpt2_run), "--tasks", "gptlab_mc", "--stride", "4")
    assert code == 2 and "--stride scores a whole split" in err
    code, _, err = gptlab("eval", str(gpt2_run), "--tasks", "gptlab_mc", "--include-path", str(gpt2_run / "nope"))
    assert code == 2 and "no such directory" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    code, _, err = gptlab("eval", str(gpt2_run), "--tasks", "hellaswag")
    assert code == 2 and err.strip() == ("gptlab eval: error: lm-evaluation-harness is not installed; install it "
                                         "with: pip install 'gptlab[eval]'")


@pytest.mark.slow
def test_lm_eval_command_line_finds_the_gptlab_model(gpt2_run: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """`python -m gptlab.evaluate.lm_eval_cli` is lm-eval's CLI with --model gptlab registered."""
    from gptlab.evaluate import lm_eval_cli

    index = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__",  # skip indexing lm-eval's 14,000 task files (half a minute)
                        lambda self, *a, **k: index(self, *a, **{**k, "include_defaults": False}))
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "gptlab", "--model_args", f"pretrained={gpt2_run}",
                                      "--tasks", "gptlab_mc", "--include_path", str(TASKS_DIR), "--limit", "2",
                                      "--output_path", str(tmp_path / "out")])
    assert lm_eval_cli.main() == 0
    (result,) = (tmp_path / "out").rglob("results_*.json")
    saved = json.loads(result.read_text())
    assert saved["config"]["model"] == "gptlab" and "gptlab_mc" in saved["results"]


def test_pyproject_declares_the_lm_eval_plugin_entry_point() -> None:
    """lm-eval releases with plugin discovery read the `lm_eval.models` group; it must name the class."""
    import importlib
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["lm_eval.models"]["gptlab"]
    module, _, name = target.partition(":")
    from lm_eval.api.model import LM

    assert issubclass(getattr(importlib.import_module(module), name), LM)
    assert any(req.startswith("lm_eval") for req in project["optional-dependencies"]["eval"])
    assert os.path.isfile(TASKS_DIR / "README.md")


@pytest.mark.slow
def test_training_records_task_scores_without_changing_the_run(char_data: Path, tmp_path: Path) -> None:
    """`gptlab train --eval-tasks ... --eval-tasks-every N`, as llm.c logs HellaSwag while training."""
    def run(name: str, **extra) -> Path:
        out = tmp_path / name
        overrides = dict(TINY_RUN, data=str(char_data), out=str(out), max_iters=10, eval_interval=5, **extra)
        train(build_train_config(overrides=overrides), show_progress=False)
        return out

    plain = run("plain")
    scored = run("scored", eval_tasks="gptlab_mc,gptlab_last_word", eval_tasks_every=10,
                 eval_tasks_path=str(TASKS_DIR), eval_tasks_limit=4)
    rows = [json.loads(line) for line in (scored / "metrics.jsonl").read_text().splitlines()]
    tasks = [row for row in rows if "task_scores" in row]
    assert [row["step"] for row in tasks] == [10]  # step 5's evaluation is not a multiple of 10
    assert set(tasks[0]["task_scores"]) >= {"gptlab_mc/acc", "gptlab_mc/acc_norm", "gptlab_last_word/perplexity"}
    def trace(path: Path) -> list[dict]:  # what training computed, without the timings
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "mfu")} for row in rows
                if "task_scores" not in row]

    assert trace(scored) == trace(plain)  # lm-eval's seeding did not move any training generator
    report = (scored / "report.md").read_text()
    assert "## lm-eval task scores during training" in report and "`gptlab_mc/acc`" in report
    assert json.loads((scored / "report.json").read_text())["task_scores"] == tasks[0]["task_scores"]
