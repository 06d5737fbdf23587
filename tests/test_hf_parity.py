"""Exact agreement with Hugging Face transformers, in both directions.

transformers is an independent implementation of GPT-2. Agreeing with it within 1e-5 in float32 on
deliberately odd shapes, with every parameter shifted away from its initial value, is the proof that
the model and the checkpoint mapping are right: an exact-erf GELU in place of GPT-2's tanh GELU
already misses by about 1e-4 (checked below, so the tolerance is known to bite).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN
from hf_reference import load_hf, random_hf_gpt2
from transformers import AutoTokenizer, GenerationConfig

from gptlab.cli import main
from gptlab.data import TokenDataset
from gptlab import generate, load_model
from gptlab import model as model_module
from gptlab.model import GPT
from gptlab.tokenizers import GPT2Tokenizer

TOL = 1e-5
GOLDEN_PROMPT = [464, 3290]  # "The dog"
GOLDEN_GREEDY = [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688, 27262, 13, 198,
                 198, 464, 3290]


@dataclass(frozen=True)
class Case:
    name: str
    config: dict
    base_layout: bool = False  # saved as GPT2Model: no lm_head, no "transformer." prefix


CASES = [
    Case("3-layers-3-heads-width-96-vocab-1003-context-77",
         dict(n_layer=3, n_head=3, n_embd=96, vocab_size=1003, n_positions=77)),
    Case("2-layers-gpt2-vocabulary", dict(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64)),
    Case("1-layer-head-dim-10-gpt2model-layout",
         dict(n_layer=1, n_head=4, n_embd=40, vocab_size=257, n_positions=40, layer_norm_epsilon=1e-3,
              activation_function="gelu_pytorch_tanh", reorder_and_upcast_attn=True),
         base_layout=True),
]


@pytest.fixture(scope="module", params=CASES, ids=[case.name for case in CASES])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(transformers' model, gptlab's model loaded from the checkpoint transformers wrote, vocab size)."""
    case: Case = request.param
    root = tmp_path_factory.mktemp(case.name)
    model = random_hf_gpt2(seed=CASES.index(case), **case.config)
    model.save_pretrained(root / "reference")
    checkpoint = root / "reference"
    if case.base_layout:
        checkpoint = root / "base"
        model.transformer.save_pretrained(checkpoint)
    return load_hf(root / "reference"), load_model(checkpoint), case.config["vocab_size"]


def random_ids(vocab_size: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@torch.no_grad()
def test_logits_agree_up_to_the_full_context(pair) -> None:
    hf, model, vocab_size = pair
    context = model.config.block_size
    assert context == hf.config.n_positions
    for length in (1, 7, context):
        ids = random_ids(vocab_size, (2, length), seed=length)
        expected, got = hf(ids).logits, model(ids).logits
        assert got.shape == expected.shape == (2, length, vocab_size)
        assert (got - expected).abs().max().item() < TOL, f"length {length}"


@torch.no_grad()
def test_the_tolerance_catches_an_exact_erf_gelu(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control: the classic GPT-2 port mistake must fail the parity test."""
    hf, model, vocab_size = pair
    ids = random_ids(vocab_size, (2, model.config.block_size), seed=1)
    expected = hf(ids).logits
    monkeypatch.setattr(model_module, "gelu", torch.nn.functional.gelu)  # the exact erf GELU
    assert (model(ids).logits - expected).abs().max().item() > TOL


@torch.no_grad()
def test_loss_agrees(pair) -> None:
    hf, model, vocab_size = pair
    ids = random_ids(vocab_size, (3, model.config.block_size), seed=2)
    expected = hf(ids, labels=ids).loss  # transformers shifts the labels itself
    got = model(ids[:, :-1], ids[:, 1:]).loss
    assert abs(got.item() - expected.item()) < TOL


@pytest.mark.slow
def test_30_greedy_tokens_match_transformers_generate(pair) -> None:
    hf, model, vocab_size = pair
    prompt = random_ids(vocab_size, (1, 5), seed=3)
    # no end-of-text stop: both sides must produce all 30 tokens
    greedy = GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)
    got = generate(model, prompt, 30, temperature=0)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 5:].tolist())) >= 5, "degenerate reference: greedy decoding repeats one token"


def val_loss(model: GPT, data_dir: Path, block_size: int) -> float:
    """Mean cross-entropy over every validation token, in consecutive windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in TokenDataset(data_dir).iter_windows("val", block_size, batch_size=16):
            total += model(x, y).loss.item() * y.numel()
            count += y.numel()
    return total / count


def assert_transformers_agrees(run_dir: Path, vocab_size: int) -> None:
    """transformers reads a gptlab directory unchanged and computes the same logits."""
    model = load_model(run_dir)
    ids = random_ids(vocab_size, (2, model.config.block_size), seed=4)
    with torch.no_grad():
        difference = (load_hf(run_dir)(ids).logits - model(ids).logits).abs().max().item()
    assert difference < TOL


def test_a_gptlab_trained_run_loads_in_transformers(tiny_run: Path) -> None:
    assert_transformers_agrees(tiny_run, load_model(tiny_run).config.vocab_size)
    assert_transformers_agrees(tiny_run / "best", load_model(tiny_run).config.vocab_size)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, gpt2_data: Path) -> tuple[Path, Path]:
    """A random 64-token GPT-2 from transformers, fine-tuned by `gptlab train --init-from` at 16 tokens."""
    root = tmp_path_factory.mktemp("finetune")
    random_hf_gpt2(seed=7, n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64).save_pretrained(
        root / "hf"
    )
    options = dict(TINY_RUN, block_size=16, max_iters=10, lr=2e-2, warmup_iters=2, eval_interval=0)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k not in ("n_layer", "n_head", "n_embd")]
    code = main(["train", "--init-from", str(root / "hf"), "--data", str(gpt2_data), "--out", str(root / "run"),
                 "--no-progress", *args])
    assert code == 0
    return root / "hf", root / "run"


@pytest.mark.slow
def test_finetuning_a_transformers_checkpoint_lowers_the_validation_loss(finetuned, gpt2_data: Path) -> None:
    hf_dir, run_dir = finetuned
    before = val_loss(load_model(hf_dir), gpt2_data, block_size=16)
    after = val_loss(load_model(run_dir), gpt2_data, block_size=16)
    assert after < before - 1.0, (before, after)


def test_a_gpt2_bpe_run_is_a_transformers_checkpoint_with_its_tokenizer(finetuned) -> None:
    _, run_dir = finetuned
    assert_transformers_agrees(run_dir, 50257)
    hf_tokenizer = AutoTokenizer.from_pretrained(run_dir)
    text = "First Citizen:\nBefore we proceed any further, hear me speak. ¿Qué? 1234 don't\n\n"
    ids = GPT2Tokenizer().encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == text


@pytest.mark.skipif(
    not os.environ.get("GPTLAB_GPT2_DIR"),
    reason="set GPTLAB_GPT2_DIR to a local copy of the real GPT-2 124M checkpoint to run the golden test",
)
def test_real_gpt2_124m_greedy_golden_output() -> None:
    model = load_model(os.environ["GPTLAB_GPT2_DIR"])
    assert model.num_parameters() == 124_439_808
    out = generate(model, torch.tensor([GOLDEN_PROMPT]), len(GOLDEN_GREEDY) - len(GOLDEN_PROMPT), temperature=0)
    assert out[0].tolist() == GOLDEN_GREEDY
