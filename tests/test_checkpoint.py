"""Checkpoints on disk: every Hugging Face GPT-2 layout in, clean exports out, and clear refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, tiny_model
from hf_reference import random_hf_gpt2
from safetensors.torch import load_file, save_file

import gptlab
from gptlab.checkpoint import load_model, save_model
from gptlab.cli import main
from gptlab.train.config import TrainConfig
from gptlab.data import TokenDataset
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.tokenizers import CharTokenizer, GPT2Tokenizer, load_tokenizer
from gptlab.train.setup import build_model

HF_CONFIG = dict(n_layer=2, n_head=2, n_embd=24, vocab_size=101, n_positions=16)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_gpt2(seed=11, **HF_CONFIG)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT2LMHeadModel checkpoint as transformers writes it: config.json + model.safetensors."""
    directory = tmp_path_factory.mktemp("hf") / "model"
    hf_model.save_pretrained(directory)
    return directory


# --- gptlab's own format --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_save_then_load_is_exact(tmp_path: Path, bias: bool) -> None:
    model = tiny_model(bias=bias)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert same_weights(model, loaded)
    assert loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_model_huggingface_cannot_represent_is_refused_on_export(tmp_path: Path) -> None:
    with pytest.raises(GptlabError, match=r"bias=False.*Hugging Face GPT-2 always has biases"):
        save_model(tiny_model(bias=False), tmp_path / "out", require_hf=True)
    assert not (tmp_path / "out").exists()
    # a run directory of such a model is marked as gptlab's own, which transformers refuses to read
    save_model(tiny_model(bias=False), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == "gptlab"
    from transformers import AutoConfig

    with pytest.raises(ValueError):
        AutoConfig.from_pretrained(tmp_path / "run")


def test_save_model_for_hf_writes_what_load_model_reads(tmp_path: Path) -> None:
    model = tiny_model()
    save_model(model, tmp_path, require_hf=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 16 and config["eos_token_id"] is None
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in stored  # tied, as transformers writes it
    assert stored["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: (in, out)
    assert same_weights(model, load_model(tmp_path))


# --- every Hugging Face layout reads to the same model ---------------------------------------------


def as_base_model(hf, directory: Path) -> None:
    hf.transformer.save_pretrained(directory)


def as_pytorch_bin(hf, directory: Path) -> None:
    """What transformers < 4.35 wrote: a pickled state dict, lm_head.weight included."""
    hf.save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")


def as_shards(hf, directory: Path) -> None:
    hf.save_pretrained(directory, max_shard_size="20KB")


def as_old_unprefixed_with_mask_buffers(hf, directory: Path) -> None:
    """The layout of the original GPT-2 upload: GPT2Model keys plus causal-mask buffers."""
    hf.transformer.save_pretrained(directory)
    state = load_file(str(directory / "model.safetensors"))
    n = HF_CONFIG["n_positions"]
    for layer in range(HF_CONFIG["n_layer"]):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("write", [as_base_model, as_pytorch_bin, as_shards, as_old_unprefixed_with_mask_buffers])
def test_every_gpt2_layout_loads_the_same_weights(hf_model, hf_dir: Path, tmp_path: Path, write) -> None:
    write(hf_model, tmp_path / "variant")
    assert same_weights(load_model(hf_dir), load_model(tmp_path / "variant"))


def test_half_precision_weights_load_as_float32(hf_model, hf_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(hf_dir, tmp_path / "half")
    state = load_file(str(hf_dir / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "half" / "model.safetensors"))
    loaded = load_model(tmp_path / "half")
    expected = load_model(hf_dir)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected.state_dict()[name].half().float())


def test_a_local_directory_wins_over_a_hub_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    save_model(model, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert same_weights(model, load_model("gpt2"))


@pytest.mark.slow
def test_a_named_size_offline_fails_fast_with_the_local_alternative(tmp_path: Path) -> None:
    """No network in tests: HF_HUB_OFFLINE makes huggingface_hub answer from an (empty) cache at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "gptlab", "sample", "gpt2-medium"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert_one_line_error(result.returncode, result.stderr, "'gpt2-medium'", "HF_HUB_OFFLINE",
                          "pass that local directory instead")


# --- loading the wrong thing ---------------------------------------------------------------------


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_header(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


def _llama(directory: Path) -> None:
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 24,
             "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 101}
    (directory / "config.json").write_text(json.dumps(llama))


def _untie(directory: Path) -> None:
    state = load_file(str(directory / "model.safetensors"))
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1
    save_file(state, str(directory / "model.safetensors"))


def _add_a_classifier_head(directory: Path) -> None:
    state = load_file(str(directory / "model.safetensors"))
    state["score.weight"] = torch.zeros(2, HF_CONFIG["n_embd"])  # as GPT2ForSequenceClassification has
    save_file(state, str(directory / "model.safetensors"))


def _garbage_bin(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle")


def _drop_a_shard(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


BROKEN = {
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "", "no model.safetensors"),
    "no config": (lambda d: (d / "config.json").unlink(), "", "no config.json"),
    "config not json": (lambda d: (d / "config.json").write_text("{"), "config.json", "not valid JSON"),
    "llama config": (_llama, "config.json", "expected a GPT-2 config (model_type 'gpt2'), found 'llama'"),
    "erf gelu": (_edit_config(activation_function="gelu"), "config.json", "not GPT-2's tanh GELU"),
    "cross attention": (_edit_config(add_cross_attention=True), "config.json", "add_cross_attention"),
    "context disagrees": (_edit_config(n_positions=20), "model.safetensors",
                          "transformer.wpe.weight has shape (16, 24), but config.json implies (20, 24)"),
    "layers disagree": (_edit_config(n_layer=3), "model.safetensors", "12 are missing (e.g. transformer.h.2."),
    "bad field": (_edit_config(n_head=0), "config.json", "n_head must be a positive integer"),
    "truncated weights": (_truncate, "model.safetensors", "truncated or corrupt"),
    "corrupt header": (_corrupt_header, "model.safetensors", "truncated or corrupt"),
    "untied head": (_untie, "model.safetensors", "tied"),
    "another head": (_add_a_classifier_head, "model.safetensors", "1 other tensor(s) (e.g. score.weight)"),
    "corrupt pytorch_model.bin": (_garbage_bin, "pytorch_model.bin", "not a readable PyTorch state dict"),
    "missing shard": (_drop_a_shard, "model.safetensors.index.json", "model-00001-of-00002.safetensors"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_loading_the_wrong_thing_names_the_file_and_what_was_expected(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    breaks, file, expected = BROKEN[case]
    directory = tmp_path / "model"
    shutil.copytree(hf_dir, directory)
    breaks(directory)
    with pytest.raises(GptlabError) as error:
        load_model(directory)
    message = str(error.value)
    assert str(directory / file) in message and expected in message, message
    code, _, err = run_cli(["sample", str(directory), "--max-new-tokens", "1"], capsys)
    assert_one_line_error(code, err, str(directory / file), expected)


def test_a_missing_directory_names_the_alternatives(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["sample", str(tmp_path / "nowhere")], capsys)
    assert_one_line_error(code, err, str(tmp_path / "nowhere"), "Hugging Face GPT-2 directory", "gpt2-medium")


# --- the command line on Hugging Face directories -------------------------------------------------


def test_sample_from_a_bare_huggingface_gpt2_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No tokenizer files beside a 50257-token checkpoint: GPT-2's own BPE is the one it was trained with."""
    random_hf_gpt2(seed=3, n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=32).save_pretrained(tmp_path)
    code, out, err = run_cli(["sample", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "5",
                              "--temperature", "0"], capsys)
    assert code == 0, err
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")


def test_eval_and_sample_accept_a_directory_laid_out_as_on_the_hub(
    tmp_path: Path, gpt2_data: Path, capsys: pytest.CaptureFixture
) -> None:
    """What `hf download openai-community/gpt2 config.json model.safetensors vocab.json merges.txt` gives."""
    random_hf_gpt2(seed=5, n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=32).save_pretrained(tmp_path)
    assets = Path(gptlab.__file__).parent / "assets"
    shutil.copy(assets / "gpt2_vocab.json", tmp_path / "vocab.json")
    shutil.copy(assets / "gpt2_merges.txt", tmp_path / "merges.txt")
    code, out, err = run_cli(["eval", str(tmp_path), "--data", str(gpt2_data), "--json"], capsys)
    assert code == 0, err
    scored = json.loads(out)["model"]
    assert scored["tokens"] == len(TokenDataset(gpt2_data).split("val")) - 1 and math.isfinite(scored["loss"])
    code, out, err = run_cli(["sample", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3"], capsys)
    assert code == 0 and out.startswith("Hi"), err


def test_sample_refuses_an_unknown_vocabulary_without_a_tokenizer(hf_dir: Path, capsys) -> None:
    code, _, err = run_cli(["sample", str(hf_dir)], capsys)
    assert_one_line_error(code, err, str(hf_dir), "no tokenizer", "101-token vocabulary")


# A character model's export: the checkpoint, gptlab's tokenizer and the same tokenizer for transformers.
CHAR_EXPORT = ["config.json", "gptlab_tokenizer.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_export_writes_a_clean_huggingface_directory(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    code, _, err = run_cli(["export", str(tiny_run), str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == CHAR_EXPORT
    assert same_weights(load_model(tiny_run), load_model(out))
    code, _, err = run_cli(["export", str(tiny_run), str(out)], capsys)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert run_cli(["export", str(tiny_run), str(out), "--overwrite"], capsys)[0] == 0


def test_export_refuses_a_model_huggingface_cannot_represent(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    save_model(tiny_model(bias=False), run)
    CharTokenizer([chr(ord("A") + i) for i in range(50)]).save(run)  # the model's 50 tokens
    code, _, err = run_cli(["export", str(run), str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "cannot export", "bias=False")
    assert not (tmp_path / "out").exists()


# --- fine-tuning from a Hugging Face directory ----------------------------------------------------


def test_init_from_crops_the_context_and_keeps_the_checkpoints_architecture(hf_model, hf_dir: Path) -> None:
    config = TrainConfig(init_from=str(hf_dir), block_size=8, n_layer=7, dropout=0.0)
    model = build_model(config, vocab_size=101, device=torch.device("cpu"))
    assert model.config.block_size == 8
    assert torch.equal(model.transformer.wpe.weight, hf_model.transformer.wpe.weight[:8])
    assert (model.config.n_layer, model.config.n_embd) == (2, 24)  # set-up records this in train_config.json


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_init_from_replaces_the_checkpoints_dropout(hf_dir: Path, dropout: float) -> None:
    assert json.loads((hf_dir / "config.json").read_text())["resid_pdrop"] == 0.1
    model = build_model(TrainConfig(init_from=str(hf_dir), block_size=16, dropout=dropout), 101, torch.device("cpu"))
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    rates |= {block.attn.dropout for block in model.transformer.h}  # the fused kernel's own rate
    assert rates == {dropout}


def test_init_from_refuses_what_cannot_be_fine_tuned(hf_dir: Path, char_data: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(GptlabError, match="--block-size 32 exceeds the context"):
        build_model(TrainConfig(init_from=str(hf_dir), block_size=32), 101, torch.device("cpu"))
    gpt2_sized = tmp_path / "gpt2-sized"
    random_hf_gpt2(seed=1, n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=32).save_pretrained(gpt2_sized)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()]
    code, _, err = run_cli(["train", "--init-from", str(gpt2_sized), "--data", str(char_data),
                            "--out", str(tmp_path / "run"), "--no-progress", *args], capsys)
    assert_one_line_error(code, err, "50257 tokens", "--tokenizer gpt2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("what", ["run", "dataset", "own files"])
def test_export_overwrite_replaces_an_export_only(what: str, tiny_run: Path, char_data: Path, tmp_path: Path,
                                                  capsys) -> None:
    """--overwrite must not clobber a run, a dataset or a user's files that happen to sit in OUT."""
    if what == "run":
        out = tmp_path / "run-copy"
        shutil.copytree(tiny_run, out)
    elif what == "dataset":
        out = tmp_path / "data-copy"
        shutil.copytree(char_data, out)
    else:
        out = tmp_path / "thesis"
        out.mkdir()
        (out / "chapter1.tex").write_text("precious")
        (out / "config.json").write_text('{"mine": true}')
    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = snapshot()
    code, _, err = run_cli(["export", str(tiny_run), str(out), "--overwrite"], capsys)
    assert_one_line_error(code, err, "holds more than an exported model", "choose another directory")
    assert snapshot() == before


def test_export_overwrite_of_an_earlier_export_leaves_no_stale_tokenizer(tiny_run: Path, tmp_path: Path,
                                                                       capsys) -> None:
    out = tmp_path / "export"
    random_hf_gpt2(seed=2, n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=32).save_pretrained(
        tmp_path / "hf")
    GPT2Tokenizer().save(tmp_path / "hf")
    assert run_cli(["export", str(tmp_path / "hf"), str(out)], capsys)[0] == 0
    assert (out / "merges.txt").is_file()
    assert run_cli(["export", str(tiny_run), str(out), "--overwrite"], capsys)[0] == 0  # now a char model
    assert sorted(p.name for p in out.iterdir()) == CHAR_EXPORT
    assert load_tokenizer(out).name == "char"
    code, _, err = run_cli(["export", str(tiny_run), ""], capsys)
    assert_one_line_error(code, err, "output directory is empty")
