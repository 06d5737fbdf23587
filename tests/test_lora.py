"""LoRA: adapters trained alone on a frozen base, saved and read in peft's format both ways, merged for export,
taken directly by sample and eval, and every bad combination refused in one line."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY_GPT2_SHAPE, needs_compile, one_line_error
from safetensors.torch import load_file

from gptlab.checkpoint import load_model
from gptlab.lora import LoRALinear, adapter_state_dict, apply_adapter, lora_config_of
from gptlab.train import build_train_config, distributed, train

peft = pytest.importorskip("peft", reason="peft (a test dependency: pip install 'gptlab[test]') reads the adapters")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # its bars would join the stderr the tests read

# a tiny GPT-2 of GPT-2's vocabulary, so that it trains on GPT-2-tokenized data
BASE_SHAPE = TINY_GPT2_SHAPE
LORA_RUN = dict(block_size=32, batch_size=4, max_iters=8, eval_interval=4, eval_iters=2, log_interval=2,
                warmup_iters=2, lr=1e-2, min_lr=1e-3, sample_tokens=0, lora_rank=4, lora_alpha=8.0)
ADAPTER_KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"  # peft's name for GPT-2's Conv1D


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def _quiet():
    """peft warns about GPT-2's Conv1D layers and the like; the tests check the numbers instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def hf_gpt2(directory: Path, seed: int, **shape) -> Path:
    """A randomly initialised GPT2LMHeadModel saved as Hugging Face saves it (no download)."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**BASE_SHAPE, **shape}))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_gpt2(tmp_path_factory.mktemp("base") / "gpt2-tiny", seed=0)


def lora_config(data: Path, base: Path, out: Path, **overrides):
    return build_train_config(overrides={**LORA_RUN, "data": str(data), "init_from": str(base), "out": str(out),
                                         **overrides})


@pytest.fixture(scope="module")
def lora_run(gpt2_data: Path, base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "lora"
    train(lora_config(gpt2_data, base, out), show_progress=False)
    return out


def tokens(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(1))


def gptlab_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens()).logits


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens()).logits


# --- training --------------------------------------------------------------------------------------


def test_a_lora_run_trains_the_adapters_alone_and_saves_them_as_peft_does(lora_run: Path, base: Path) -> None:
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in lora_run.iterdir()}
    assert not (lora_run / "model.safetensors").exists()  # the base is not copied into the run
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == ("LORA", 4, 8.0, True)
    assert config["base_model_name_or_path"] == str(base.resolve())
    weights = load_file(lora_run / "adapter_model.safetensors")
    # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    assert len(weights) == 16 and ADAPTER_KEY in weights
    assert weights[ADAPTER_KEY].shape == (4, 32)
    assert weights["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"].shape == (128, 4)
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)  # B started at zero and trained

    adapted, original = load_model(lora_run, merge=False), load_model(base)
    frozen = {n: t for n, t in adapted.state_dict().items() if "lora_" not in n}
    assert frozen.keys() == original.state_dict().keys()
    assert all(torch.equal(t, original.state_dict()[n]) for n, t in frozen.items())  # the base did not move

    state = torch.load(lora_run / "training_state.pt", weights_only=True)
    assert set(state["model"]) == set(adapter_state_dict(adapted))  # no copy of the frozen base
    moments = state["optimizer"]["state"]
    assert len(moments) == 16  # optimizer state for the adapters' tensors and nothing else
    assert sum(m["exp_avg"].numel() for m in moments.values()) == sum(t.numel() for t in weights.values())


def test_peft_loads_a_gptlab_adapter_with_equal_logits(lora_run: Path, base: Path) -> None:
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(base)
    with _quiet():
        peft_model = peft.PeftModel.from_pretrained(hf_base, lora_run)
    expected = hf_logits(peft_model)
    ours = gptlab_logits(load_model(lora_run, merge=False))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gptlab_logits(load_model(lora_run)), expected, atol=1e-5, rtol=0)  # merged
    assert (ours - gptlab_logits(load_model(base))).abs().max() > 1e-3  # the adapter changes the model


def test_gptlab_loads_an_adapter_that_peft_wrote(base: Path, tmp_path: Path) -> None:
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(base)
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    with _quiet():
        model = peft.get_peft_model(hf_base, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # peft starts B at zero: an identity adapter would prove nothing
    model.save_pretrained(tmp_path / "adapter")
    expected = hf_logits(model)
    assert (expected - hf_logits(transformers.GPT2LMHeadModel.from_pretrained(base))).abs().max() > 1e-3

    unmerged = load_model(tmp_path / "adapter", merge=False)
    layers = {n for n, m in unmerged.named_modules() if isinstance(m, LoRALinear)}
    assert layers == {f"transformer.h.{i}.{layer}" for i in (0, 1) for layer in ("attn.c_attn", "mlp.c_proj")}
    assert lora_config_of(unmerged).rank == 3
    torch.testing.assert_close(gptlab_logits(unmerged), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gptlab_logits(load_model(tmp_path / "adapter")), expected, atol=1e-5, rtol=0)
    # on a base already loaded: the Python API
    torch.testing.assert_close(gptlab_logits(apply_adapter(load_model(base), tmp_path / "adapter")), expected,
                               atol=1e-5, rtol=0)


# --- export, sample, eval --------------------------------------------------------------------------


def test_export_merge_writes_a_plain_gpt2_that_transformers_loads(lora_run: Path, tmp_path: Path, gptlab) -> None:
    code, out, err = gptlab("export", str(lora_run), str(tmp_path / "merged"), "--merge")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors"} <= names and not names & {"adapter_config.json"}
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(hf_logits(merged), gptlab_logits(load_model(lora_run, merge=False)), atol=1e-5, rtol=0)

    code, _, err = gptlab("export", str(lora_run), str(tmp_path / "adapter"))  # without --merge: the adapter
    assert code == 0, err
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert not (tmp_path / "adapter" / "training_state.pt").exists()
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(t, load_file(lora_run / "adapter_model.safetensors")[k]) for k, t in exported.items())


def test_sample_and_eval_take_an_adapter_directly(lora_run: Path, tmp_path: Path, gpt2_data: Path, gptlab) -> None:
    code, _, err = gptlab("export", str(lora_run), str(tmp_path / "merged"), "--merge")
    assert code == 0, err
    sample = ["--prompt", "First Citizen", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    code, from_adapter, err = gptlab("sample", str(lora_run), *sample)
    assert code == 0, err
    code, from_merged, err = gptlab("sample", str(tmp_path / "merged"), *sample)
    assert code == 0, err
    code, from_base, err = gptlab("sample", str(json.loads((lora_run / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"]), *sample)
    assert code == 0, err
    assert from_adapter == from_merged and from_adapter != from_base

    scores = []
    for model in (lora_run, tmp_path / "merged"):
        code, out, err = gptlab("eval", str(model), "--data", str(gpt2_data), "--device", "cpu", "--json")
        assert code == 0, err
        scores.append(json.loads(out)["model"])
    assert scores[0]["tokens"] == scores[1]["tokens"] > 0
    assert scores[0]["nll"] == pytest.approx(scores[1]["nll"], rel=1e-5)


# --- resume, bf16, gradient accumulation -----------------------------------------------------------


def trace(run_dir: Path) -> dict[tuple[str, int], float]:
    """(loss or val_loss, step) -> value, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(kind, row["step"]): row[kind] for row in rows for kind in ("loss", "val_loss") if kind in row}


@pytest.mark.slow
def test_a_resumed_lora_run_equals_an_uninterrupted_one(gpt2_data: Path, base: Path, tmp_path: Path) -> None:
    options = dict(lr_decay_iters=8, dropout=0.1, lora_dropout=0.1)  # dropout: the random states travel too
    reference = tmp_path / "reference"
    train(lora_config(gpt2_data, base, reference, **options), show_progress=False)
    resumed = tmp_path / "resumed"
    train(lora_config(gpt2_data, base, resumed, **options, max_iters=4), show_progress=False)
    train(lora_config(gpt2_data, base, resumed, **options), resume=True, show_progress=False)
    assert trace(resumed) == trace(reference) and len(trace(reference)) >= 6
    final = load_file(resumed / "adapter_model.safetensors")
    expected = load_file(reference / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(dtype="bfloat16"), dict(grad_accum=2, batch_size=2)],
                         ids=["bfloat16", "grad-accum"])
def test_bf16_and_gradient_accumulation_train_the_adapters_alone(
    options: dict, gpt2_data: Path, base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = train(lora_config(gpt2_data, base, out, max_iters=4, **options), show_progress=False)
    assert torch.isfinite(torch.tensor(result.val_loss))
    adapted, original = load_model(out, merge=False), load_model(base)
    assert all(torch.equal(t, original.state_dict()[n]) for n, t in adapted.state_dict().items() if "lora_" not in n)
    assert all(t.dtype == torch.float32 for t in adapted.state_dict().values())
    weights = load_file(out / "adapter_model.safetensors")
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)


# --- bad combinations ------------------------------------------------------------------------------


def lora_args(data: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--init-from", str(base), "--out", str(out), "--no-progress",
            "--block-size", "32", "--max-iters", "2", "--eval-iters", "1", "--sample-tokens", "0", *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["--lora-rank", "-2"], "--lora-rank must be at least 1"),
    (["--lora-rank", "4", "--lora-targets", "c_attn,q_proj"], "'q_proj' names no layer of GPT-2"),
    (["--lora-rank", "4", "--lora-targets", ","], "--lora-targets names no layer"),
    (["--lora-alpha", "32"], "--lora-alpha configure LoRA adapters: give --lora-rank R"),
    (["--lora-rank", "4", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--lora-rank", "4", "--optimizer", "muon"], "--optimizer muon"),
])
def test_bad_lora_options_are_one_line_and_exit_2(extra, fragment, gpt2_data, base, tmp_path, gptlab) -> None:
    code, _, err = gptlab(*lora_args(gpt2_data, base, tmp_path / "run", *extra))
    one_line_error(code, err, 2, fragment)
    assert not (tmp_path / "run").exists()


def test_lora_without_init_from_is_refused(gpt2_data: Path, tmp_path: Path, gptlab) -> None:
    code, _, err = gptlab("train", "--data", str(gpt2_data), "--out", str(tmp_path / "run"), "--lora-rank", "4")
    one_line_error(code, err, 2, "--lora-rank adapts a pretrained model: give --init-from")


def test_lora_options_on_a_run_without_an_adapter_are_refused(
    base: Path, gpt2_data: Path, tmp_path: Path, gptlab
) -> None:
    code, _, err = gptlab("export", str(base), str(tmp_path / "out"), "--merge")
    one_line_error(code, err, 2, "holds no LoRA adapter")
    assert not (tmp_path / "out").exists()
    full = tmp_path / "full"
    code, _, err = gptlab("train", "--data", str(gpt2_data), "--init-from", str(base), "--out", str(full),
                          "--no-progress", "--block-size", "32", "--max-iters", "2", "--eval-iters", "1",
                          "--sample-tokens", "0")
    assert code == 0, err
    code, _, err = gptlab("train", "--out", str(full), "--resume", "--lora-rank", "4", "--max-iters", "3")
    one_line_error(code, err, 2, "without a LoRA adapter; --lora-rank starts a new run")


def peft_adapter_claiming(base: Path, trained_on: Path, directory: Path) -> Path:
    """An adapter peft wrote for the model `trained_on`, whose config names `base` as its base instead."""
    with _quiet():
        model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(trained_on),
                                    peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    model.save_pretrained(directory)
    config_path = directory / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(base)}))
    return directory


def test_an_adapter_for_another_base_is_refused(base: Path, tmp_path: Path, gptlab) -> None:
    wider = peft_adapter_claiming(base, hf_gpt2(tmp_path / "wider", seed=1, n_embd=48), tmp_path / "adapter")
    code, _, err = gptlab("sample", str(wider), "--max-new-tokens", "2", "--device", "cpu")
    one_line_error(code, err, 2, "an adapter for another base model")

    deeper = peft_adapter_claiming(base, hf_gpt2(tmp_path / "deeper", seed=1, n_layer=3), tmp_path / "adapter3")
    code, _, err = gptlab("eval", str(deeper), "--text", str(deeper / "adapter_config.json"), "--device", "cpu")
    one_line_error(code, err, 2, "the adapter does not fit this model")


def test_an_adapter_gptlab_cannot_apply_is_refused(base: Path, tmp_path: Path, gptlab) -> None:
    with _quiet():
        model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base),
                                    peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    code, _, err = gptlab("sample", str(tmp_path / "dora"), "--max-new-tokens", "2", "--device", "cpu")
    one_line_error(code, err, 2, "use_dora=True asks for more than plain LoRA")


# --- DDP and torch.compile -------------------------------------------------------------------------


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_a_lora_run_as_one_does(gpt2_data: Path, base: Path, tmp_path: Path) -> None:
    """DDP all-reduces the adapters' gradients (the frozen base has none), so 2 processes step as 1 does."""
    options = dict(grad_accum=2, batch_size=2, max_iters=4, eval_interval=2, log_interval=1)
    one = tmp_path / "one"
    train(lora_config(gpt2_data, base, one, **options), show_progress=False)
    two = tmp_path / "two"
    argv = ["train", "--data", str(gpt2_data), "--init-from", str(base), "--out", str(two), "--no-progress",
            "--nproc", "2", *(f"--{k.replace('_', '-')}={v}" for k, v in {**LORA_RUN, **options}.items())]
    clean = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    result = subprocess.run([sys.executable, "-m", "gptlab", *argv], env={**clean, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = metric_rows(two), metric_rows(one)
    assert [(r["step"], "loss" in r, "val_loss" in r) for r in ours] == [(r["step"], "loss" in r, "val_loss" in r)
                                                                        for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    adapters = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[1])


@pytest.mark.slow
@needs_compile()
def test_a_compiled_lora_run_trains_like_an_eager_one(gpt2_data: Path, base: Path, tmp_path: Path) -> None:
    options = dict(max_iters=3, eval_interval=0, log_interval=1)
    eager = trace(train(lora_config(gpt2_data, base, tmp_path / "eager", **options), show_progress=False).run_dir)
    compiled = trace(train(lora_config(gpt2_data, base, tmp_path / "compiled", compile=True, **options),
                           show_progress=False).run_dir)
    assert compiled.keys() == eager.keys() and ("loss", 3) in eager
    for key in eager:
        assert compiled[key] == pytest.approx(eager[key], abs=1e-4)
    weights = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)


def test_an_adapter_that_names_no_base_is_refused(lora_run: Path, tmp_path: Path, gptlab) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((lora_run / "adapter_model.safetensors").read_bytes())
    config = json.loads((lora_run / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    code, _, err = gptlab("sample", str(adapter), "--max-new-tokens", "2", "--device", "cpu")
    one_line_error(code, err, 2, "names no base model (base_model_name_or_path)")
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(adapter)}))
    code, _, err = gptlab("sample", str(adapter), "--max-new-tokens", "2", "--device", "cpu")
    one_line_error(code, err, 2, "names the adapter's own directory as its base")
