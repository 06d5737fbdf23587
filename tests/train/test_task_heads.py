"""train --task classify / choice: GPT-1's fine-tuning of a pretrained GPT-2 with a task head, saved so that
transformers (and peft, for a LoRA run) read it with equal logits; resumed and accumulated exactly; scored by
gptlab eval and gptlab classify."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY_GPT2_SHAPE, TINY_TEXT, needs_compile, one_line_error
from safetensors.torch import load_file

from gptlab.checkpoint import load_model, load_task_model
from gptlab.data import labeled
from gptlab.heads import MultipleChoice, SequenceClassifier
from gptlab.inference.classify import choice_batch, encode_choice, load_classifier, pad_rows
from gptlab.tokenizers import GPT2Tokenizer
from gptlab.train import build_train_config, distributed, train

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

BASE_SHAPE = TINY_GPT2_SHAPE
RUN = dict(block_size=32, batch_size=4, max_iters=6, eval_interval=3, eval_iters=2, log_interval=2,
           warmup_iters=2, lr=1e-2, min_lr=1e-3, sample_tokens=0)
WORDS = "the cat dog sat ran on mat hat big small red blue".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised GPT-2 of GPT-2's vocabulary, as transformers saves it (no download)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "gpt2-tiny"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**BASE_SHAPE)).save_pretrained(directory)
    return directory


def classify_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts whose last word gives the label away: a head on a random body learns it in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["woe", "joy", "meh"])
        ending = {"joy": "happy", "woe": "sad", "meh": "fine"}[label]
        rows.append({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + " " + ending,
                     "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def classify_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "moods.jsonl", classify_rows(60))


@pytest.fixture(scope="module")
def choice_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(1)
    rows = [{"context": " ".join(rng.choice(WORDS) for _ in range(5)), "choices": ["yes", "no", "maybe so"],
             "label": i % 3} for i in range(30)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "choices.jsonl", rows)


def config(task: str, data: Path, base: Path, out: Path, **overrides):
    return build_train_config(overrides={**RUN, "task": task, "data": str(data), "init_from": str(base),
                                         "out": str(out), **overrides})


@pytest.fixture(scope="module")
def classify_run(classify_data: Path, base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "classify"
    train(config("classify", classify_data, base, out), show_progress=False)
    return out


def texts() -> list[str]:
    return ["the big cat sat happy", "a red hat sad", "dog fine", "on the mat ran the small blue dog"]


def padded_ids(pad: int) -> torch.Tensor:
    tokenizer = GPT2Tokenizer()
    return pad_rows([tokenizer.encode(t) for t in texts()], pad)  # (4, T) of rows of different lengths


# --- classify --------------------------------------------------------------------------------------


def test_a_classifier_run_names_its_labels_and_logs_loss_and_accuracy(classify_run: Path) -> None:
    saved = json.loads((classify_run / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"]
    assert saved["id2label"] == {"0": "joy", "1": "meh", "2": "woe"}  # the training labels, sorted
    assert saved["pad_token_id"] == 50256  # GPT-2's end-of-text pads, so transformers reads the same token
    rows = [json.loads(line) for line in (classify_run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in rows if "val_accuracy" in row]
    assert [row["step"] for row in evaluations] == [3, 6]
    assert all(0 <= row["val_accuracy"] <= 1 and row["val_loss"] > 0 for row in evaluations)
    report = json.loads((classify_run / "report.json").read_text())
    assert report["val_accuracy"] == evaluations[-1]["val_accuracy"] and report["val_examples"] == 6
    body = load_model(classify_run)  # what --init-from reads: the body alone, not the head
    assert not hasattr(body, "score")


def test_an_exported_classifier_run_loads_in_transformers_with_equal_logits(classify_run: Path, tmp_path: Path,
                                                                            gptlab) -> None:
    code, _, err = gptlab("export", str(classify_run), str(tmp_path / "export"))
    assert code == 0, err
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert hf.config.id2label == {0: "joy", 1: "meh", 2: "woe"}
    ours = load_task_model(classify_run)
    ids = padded_ids(ours.pad_token_id)
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    assert expected.argmax(-1).unique().numel() > 1  # the trained head tells the texts apart


def test_a_classifier_saved_by_transformers_trains_on_and_classifies_in_gptlab(tmp_path: Path, base: Path,
                                                                              gptlab) -> None:
    torch.manual_seed(3)
    hf_config = transformers.GPT2Config(**BASE_SHAPE, pad_token_id=50256, id2label={0: "no", 1: "yes"})
    hf = transformers.GPT2ForSequenceClassification(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    GPT2Tokenizer().save(tmp_path / "hf")
    classifier = load_classifier(tmp_path / "hf")
    with torch.no_grad():
        expected = torch.softmax(hf(padded_ids(50256)).logits, -1)
    torch.testing.assert_close(classifier.predict(texts()), expected, atol=1e-5, rtol=0)
    code, out, err = gptlab("classify", str(tmp_path / "hf"), "--text", texts()[0], "--json")
    assert code == 0, err
    row = json.loads(out)[0]
    assert row["label"] in ("no", "yes") and sum(row["probabilities"].values()) == pytest.approx(1.0)
    assert row["probabilities"]["yes"] == pytest.approx(expected[0, 1].item(), abs=1e-5)


def test_eval_and_classify_report_on_a_classifier_run(classify_run: Path, classify_data: Path, gptlab) -> None:
    code, out, err = gptlab("eval", str(classify_run), "--data", str(classify_data), "--json")
    assert code == 0, err
    result = json.loads(out)
    classifier = load_classifier(classify_run)
    rows = [json.loads(line) for line in classify_data.read_text().splitlines()]
    predicted = [classifier.labels[i] for i in classifier.predict([r["text"] for r in rows]).argmax(-1).tolist()]
    expected = [[sum(1 for r, p in zip(rows, predicted) if r["label"] == t and p == q) for q in classifier.labels]
                for t in classifier.labels]
    assert result["count"] == 60 and result["confusion"] == expected
    assert result["accuracy"] == pytest.approx(sum(p == r["label"] for r, p in zip(rows, predicted)) / 60)
    code, out, _ = gptlab("eval", str(classify_run), "--data", str(classify_data))
    assert code == 0 and "| true \\ predicted | joy | meh | woe |" in out and "accuracy" in out
    code, out, err = gptlab("classify", str(classify_run), "--text", "one", "--text", "two")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 2 and all(line.split("\t")[0] in classifier.labels
                                                       for line in out.strip().splitlines())


@pytest.mark.slow
def test_a_resumed_classifier_run_equals_an_uninterrupted_one(classify_data: Path, base: Path, tmp_path: Path) -> None:
    # dropout: the random states travel too; evaluations at steps 2, 4 and 6, the first session ending at 4
    options = dict(lr_decay_iters=6, dropout=0.1, lm_loss_weight=0.5, eval_interval=2)
    train(config("classify", classify_data, base, tmp_path / "reference", **options), show_progress=False)
    train(config("classify", classify_data, base, tmp_path / "resumed", **options, max_iters=4), show_progress=False)
    train(config("classify", classify_data, base, tmp_path / "resumed", **options), resume=True, show_progress=False)
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "reference")
    final, expected = load_file(tmp_path / "resumed" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


def metrics(run_dir: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(kind, row["step"]): row[kind] for row in rows
            for kind in ("loss", "val_loss", "val_accuracy") if kind in row}


def test_gradient_accumulation_computes_what_one_larger_batch_does(classify_data: Path, base: Path,
                                                                     tmp_path: Path) -> None:
    """Two micro-batches of 2 draw the same 4 examples as one batch of 4; padding to each micro-batch's own
    width changes nothing a classifier reads, so every step's loss agrees to rounding. (The weights are not
    compared: the keys' biases get a gradient of zero but for rounding, which Adam scales up to a step.)"""
    options = dict(max_iters=3, log_interval=1, eval_interval=0)
    train(config("classify", classify_data, base, tmp_path / "one", **options), show_progress=False)
    train(config("classify", classify_data, base, tmp_path / "two", **options, batch_size=2, grad_accum=2),
          show_progress=False)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert one.keys() == two.keys() and len([k for k in one if k[0] == "loss"]) == 3
    assert all(one[k] == pytest.approx(two[k], abs=1e-6) for k in one)
    assert one[("loss", 3)] < one[("loss", 1)]  # and it learns


@pytest.mark.slow
@pytest.mark.parametrize("options, tolerance", [
    (dict(dtype="bfloat16"), 5e-2),  # bf16 products round to 3 significant digits; the weights stay float32
    pytest.param(dict(compile=True), 1e-4, marks=needs_compile()),  # fused kernels: float32 rounding alone
], ids=["bfloat16", "compile"])
def test_a_classifier_trains_under_bf16_and_compile_as_in_float32(options: dict, tolerance: float,
                                                                  classify_data: Path, base: Path,
                                                                  tmp_path: Path) -> None:
    common = dict(max_iters=3, log_interval=1, eval_interval=3, lm_loss_weight=0.5)
    train(config("classify", classify_data, base, tmp_path / "float32", **common), show_progress=False)
    train(config("classify", classify_data, base, tmp_path / "run", **common, **options), show_progress=False)
    expected, got = metrics(tmp_path / "float32"), metrics(tmp_path / "run")
    assert got.keys() == expected.keys() and ("val_accuracy", 3) in got
    assert all(got[k] == pytest.approx(expected[k], abs=tolerance) for k in expected if k[0] != "val_accuracy")
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "run" / "model.safetensors").values())
    if "dtype" in options:  # autocast did run in bf16: its losses are not float32's to the bit
        assert got[("loss", 1)] != expected[("loss", 1)]


@pytest.mark.slow
def test_two_processes_train_a_classifier_as_one_does(classify_data: Path, base: Path, tmp_path: Path) -> None:
    """Under torchrun each process takes its rows of the step's examples and its share of the validation
    batches; the sums are all-reduced, so the losses and accuracies are one process's."""
    options = dict(grad_accum=2, batch_size=2, max_iters=4, eval_interval=2, log_interval=1)
    train(config("classify", classify_data, base, tmp_path / "one", **options), show_progress=False)
    argv = ["train", "--task", "classify", "--data", str(classify_data), "--init-from", str(base), "--out",
            str(tmp_path / "two"), "--no-progress", "--nproc", "2",
            *(f"--{k.replace('_', '-')}={v}" for k, v in {**RUN, **options}.items())]
    clean = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    result = subprocess.run([sys.executable, "-m", "gptlab", *argv], env={**clean, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert one.keys() == two.keys() and ("val_accuracy", 4) in one
    assert all(two[k] == pytest.approx(one[k], abs=1e-5) for k in one)


# --- LoRA ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_a_lora_classifier_trains_the_head_and_peft_loads_it_with_equal_logits(
    classify_data: Path, base: Path, tmp_path: Path, gptlab
) -> None:
    peft = pytest.importorskip("peft", reason="peft (a test dependency) reads the adapters")
    out = tmp_path / "lora"
    train(config("classify", classify_data, base, out, lora_rank=4, lora_alpha=8.0), show_progress=False)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["score"] and adapter["task_type"] == "SEQ_CLS"
    weights = load_file(out / "adapter_model.safetensors")
    assert weights["base_model.model.score.weight"].shape == (3, 32)
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert "score.weight" in state["model"] and "transformer.wte.weight" not in state["model"]

    hf_base = transformers.GPT2ForSequenceClassification.from_pretrained(base, num_labels=3, pad_token_id=50256)
    with _quiet():
        peft_model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ids = padded_ids(50256)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        torch.testing.assert_close(load_task_model(out, merge=False)(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_task_model(out)(ids).logits, expected, atol=1e-5, rtol=0)  # merged
    assert load_classifier(out).labels == ("joy", "meh", "woe")  # task_head.json names them beside the adapter
    merged = tmp_path / "merged"
    assert gptlab("export", str(out), str(merged), "--merge")[0] == 0
    with torch.no_grad():  # merged: a plain GPT2ForSequenceClassification directory
        torch.testing.assert_close(transformers.GPT2ForSequenceClassification.from_pretrained(merged).eval()(ids).logits,
                                   expected, atol=1e-5, rtol=0)
    original = load_model(base)
    adapted = load_task_model(out, merge=False)
    assert all(torch.equal(t, original.state_dict()[n]) for n, t in adapted.state_dict().items()
               if "lora_" not in n and not n.startswith("score."))  # the base did not move


@pytest.mark.slow
def test_a_resumed_lora_classifier_run_equals_an_uninterrupted_one(classify_data: Path, base: Path,
                                                                    tmp_path: Path) -> None:
    options = dict(lr_decay_iters=6, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, eval_interval=2)
    train(config("classify", classify_data, base, tmp_path / "reference", **options), show_progress=False)
    train(config("classify", classify_data, base, tmp_path / "resumed", **options, max_iters=4), show_progress=False)
    train(config("classify", classify_data, base, tmp_path / "resumed", **options), resume=True, show_progress=False)
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "reference")
    final = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


# --- multiple choice -------------------------------------------------------------------------------


def choice_inputs(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = GPT2Tokenizer()
    rows = [[encode_choice(tokenizer, context, c, 32)[0] for c in ("yes", "no", "maybe so")]
            for context in ("the cat sat", "a big red dog ran on the mat")]
    return choice_batch(rows, pad)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_choice_run_loads_in_gpt2_double_heads_with_equal_logits(lora: bool, choice_data: Path, base: Path,
                                                                   tmp_path: Path, gptlab) -> None:
    options = dict(lm_loss_weight=0.5) | (dict(lora_rank=4, lora_alpha=8.0) if lora else {})
    out = tmp_path / "run"
    train(config("choice", choice_data, base, out, **options), show_progress=False)
    ids, mc = choice_inputs(50256)
    ours = load_task_model(out)
    assert isinstance(ours, MultipleChoice)
    with torch.no_grad():
        got = ours(ids, mc, with_lm_logits=True)
    if lora:
        peft = pytest.importorskip("peft", reason="peft (a test dependency) reads the adapters")
        with _quiet():
            hf = peft.PeftModel.from_pretrained(transformers.GPT2DoubleHeadsModel.from_pretrained(base), out).eval()
    else:
        code, _, err = gptlab("export", str(out), str(tmp_path / "export"))
        assert code == 0, err
        hf = transformers.GPT2DoubleHeadsModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        expected = hf(input_ids=ids, mc_token_ids=mc)
    torch.testing.assert_close(got.logits, expected.mc_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.lm_logits, expected.logits, atol=1e-5, rtol=0)
    assert got.logits.std() > 0  # the trained head scores the choices differently
    code, out_text, err = gptlab("eval", str(out), "--data", str(choice_data), "--json")
    assert code == 0, err
    assert json.loads(out_text)["count"] == 30 and "confusion" not in json.loads(out_text)


def test_the_auxiliary_lm_loss_enters_the_training_loss(classify_data: Path, base: Path, tmp_path: Path) -> None:
    """With --lm-loss-weight the logged training loss is GPT-1's L2 + lambda * L1: far above the task's
    cross-entropy alone (a random 50,257-way LM starts near ln 50257 = 10.8)."""
    train(config("classify", classify_data, base, tmp_path / "plain", max_iters=2), show_progress=False)
    train(config("classify", classify_data, base, tmp_path / "aux", max_iters=2, lm_loss_weight=0.5),
          show_progress=False)
    first = {name: metrics(tmp_path / name)[("loss", 2)] for name in ("plain", "aux")}
    assert first["plain"] < 2.0 and first["aux"] > 4.0
    saved = json.loads((tmp_path / "aux" / "train_config.json").read_text())
    assert saved["lm_loss_weight"] == 0.5 and isinstance(load_task_model(tmp_path / "aux"), SequenceClassifier)


# --- data sources ----------------------------------------------------------------------------------


def test_a_directory_of_csv_files_with_integer_labels(base: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 40), ("val", 12)):
        rows = classify_rows(n, seed=n)
        numbers = {"joy": 10, "woe": 2, "meh": 1}
        lines = ["text,label"] + [f'"{r["text"]}",{numbers[r["label"]]}' for r in rows]
        (data / f"{split}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    train(config("classify", data, base, out, max_iters=2, eval_interval=0), show_progress=False)
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "1", "1": "2", "2": "10"}  # by value
    assert json.loads((out / "report.json").read_text())["val_examples"] == 12  # val.csv, whole


def test_a_built_in_task_fine_tunes_a_character_run(tiny_run: Path, tmp_path: Path, monkeypatch, gptlab) -> None:
    """What the built-in play-kind task does with the demo's character model: --data names an entry of
    gptlab.data.labeled.BUILTIN, the character vocabulary's newline pads, long passages keep their end."""
    speakers = {"First Citizen": "citizen", "All": "all"}
    passages = [block for block in TINY_TEXT.split("\n\n") if block]
    examples = [(block, speakers[block.split(":")[0]]) for block in passages]
    monkeypatch.setitem(labeled.BUILTIN, "toy-speakers", lambda context: {"train": examples[:120], "val": examples[120:]})
    out = tmp_path / "run"
    code, _, err = gptlab("train", "--task", "classify", "--data", "toy-speakers", "--init-from", str(tiny_run),
                          "--out", str(out), "--no-progress", "--block-size", "24", "--batch-size", "8",
                          "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--lr", "1e-2",
                          "--warmup-iters", "1")
    assert code == 0, err
    assert "validation: the built-in task's validation split" in err and "keep their last 24 tokens" in err
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "all", "1": "citizen"} and saved["pad_token_id"] == 0  # "\n" is id 0 here
    assert json.loads((out / "train_config.json").read_text())["data"] == "toy-speakers"
    code, text, err = gptlab("eval", str(out), "--data", "toy-speakers", "--json")
    assert code == 0, err
    assert json.loads(text)["count"] == len(examples) - 120 and json.loads(text)["source"] == "toy-speakers (val)"


# --- bad combinations ------------------------------------------------------------------------------


def train_args(task: str, data: Path, out: Path, *extra: str, base: Path | None = None) -> list[str]:
    args = ["train", "--task", task, "--data", str(data), "--out", str(out), "--no-progress", "--block-size", "32",
            "--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "0"]
    return args + (["--init-from", str(base)] if base else []) + list(extra)


@pytest.mark.parametrize("rows, fragment", [
    ([{"text": "a"}] * 12, "no label"),
    ([{"label": "x"}] * 12, "no text"),
    ([{"text": "a", "label": "x"}] * 12, "every training example has the label 'x'"),
    ([{"text": "a", "label": 1.5}] * 12, "the label must be a non-empty string or an integer"),
    ([{"text": "a", "label": "x"}] * 3, "too few to hold one in 10 out"),
])
def test_bad_classify_data_is_one_line_and_exit_2(rows, fragment, base: Path, tmp_path: Path, gptlab) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = gptlab(*train_args("classify", data, tmp_path / "run", base=base))
    one_line_error(code, err, 2, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row, fragment", [
    ({"context": "c", "choices": ["a", "b"], "label": 2}, "label must be the index of the right choice, 0 to 1"),
    ({"context": "c", "choices": ["a"], "label": 0}, "choices must be a list of at least 2"),
    ({"context": "c", "choices": ["a", "b " * 40], "label": 0}, "leaving no room for the context"),
])
def test_bad_choice_data_is_one_line_and_exit_2(row, fragment, base: Path, tmp_path: Path, gptlab) -> None:
    good = {"context": "c", "choices": ["a", "b"], "label": 0}
    data = write_jsonl(tmp_path / "bad.jsonl", [good] * 5 + [row] + [good] * 6)
    code, _, err = gptlab(*train_args("choice", data, tmp_path / "run", base=base))
    one_line_error(code, err, 2, fragment, "bad.jsonl")
    assert not (tmp_path / "run").exists()


def test_bad_task_options_are_one_line_and_exit_2(classify_data: Path, base: Path, tmp_path: Path, gptlab) -> None:
    cases = [
        (train_args("classify", classify_data, tmp_path / "run"), "--task classify fine-tunes a pretrained model"),
        (train_args("text", classify_data, tmp_path / "run", "--lm-loss-weight", "0.5"),
         "--lm-loss-weight weighs GPT-1's auxiliary LM loss"),
        (train_args("classify", classify_data, tmp_path / "run", "--lm-loss-weight", "-1", base=base),
         "--lm-loss-weight must not be negative"),
        (train_args("classify", tmp_path / "missing.jsonl", tmp_path / "run", base=base), "no such file"),
        (train_args("choice", classify_data, tmp_path / "run", base=base), "no context string"),
        (train_args("classify", classify_data, tmp_path / "run", "--eval-tasks", "hellaswag", base=base),
         "--eval-tasks scores a language model"),
        (["train", "--task", "classify", "--init-from", str(base), "--out", str(tmp_path / "run")], "needs --data"),
    ]
    for args, fragment in cases:
        code, _, err = gptlab(*args)
        one_line_error(code, err, 2, fragment)
        assert not (tmp_path / "run").exists()


def test_classify_and_eval_refuse_what_they_cannot_score(classify_run: Path, base: Path, tmp_path: Path,
                                                         gptlab) -> None:
    code, _, err = gptlab("classify", str(base), "--text", "hello")
    one_line_error(code, err, 2, "has no task head")
    unknown = write_jsonl(tmp_path / "other.jsonl", [{"text": "a dog", "label": "angry"}, {"text": "b", "label": "joy"}])
    code, _, err = gptlab("eval", str(classify_run), "--data", str(unknown))
    one_line_error(code, err, 2, "'angry' unknown to the run", "joy, meh, woe")
    code, _, err = gptlab("eval", str(classify_run), "--text", str(unknown))
    one_line_error(code, err, 2, "--text scores a language model")
