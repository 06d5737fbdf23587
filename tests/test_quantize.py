"""int8 weight-only decoding: the quantized model computes the float one's logits closely, on every
product it may choose, from the command line too, and never changes the files it was loaded from."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from gptlab import kernels
from gptlab.checkpoint import load_model, save_model
from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.inference import generate
from gptlab.kernels import chooser, force, int8_linear, int8_products
from gptlab.kernels.int8 import KEPT
from gptlab.quantize import Int8Embedding, Int8Linear, quantize_int8, quantize_rows
from gptlab.model import GPT


def test_each_row_is_rounded_to_its_own_scale() -> None:
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 40)[:, None]
    values, scales = quantize_rows(weight)
    assert values.dtype == torch.int8 and values.abs().max() == 127
    error = (values.float() * scales[:, None] - weight).abs()
    assert torch.all(error <= scales[:, None] / 2 * (1 + 1e-6))  # half a step of the row's own scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_every_int8_product_is_the_dequantized_product(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    values, scales = quantize_rows(torch.randn(96, 64, generator=g))
    x = torch.randn(rows, 64, generator=g).to(dtype)
    reference = F.linear(x.double(), values.double() * scales.double()[:, None])
    products = int8_products(x, values)
    assert "dequantized" in products and "int8 kernel" in products  # a CPU has torch's packed int8 kernel
    for name, product in products.items():
        got = product(x, values, scales.to(dtype))
        assert got.dtype == dtype and got.shape == (rows, 96), name
        # bf16 rounds the activations to 8 significant bits: relative error ~ 2^-8 per product
        tolerance = 1e-5 if dtype == torch.float32 and "bf16" not in name else 2e-2
        assert (got.double() - reference).abs().max() <= tolerance * reference.abs().max(), name


def test_widths_the_reduced_precision_kernel_cannot_take_are_left_to_the_others() -> None:
    """torch's bf16 int8 path needs the width to be a multiple of 16 (it reads out of bounds otherwise)."""
    weight = torch.zeros(32, 300, dtype=torch.int8)
    assert set(int8_products(torch.zeros(1, 300), weight)) == {"dequantized", "int8 kernel"}
    assert set(int8_products(torch.zeros(1, 300, dtype=torch.bfloat16), weight)) == {"dequantized"}


def quantized_copy(model: GPT) -> GPT:
    return quantize_int8(copy.deepcopy(model))


def test_quantizing_stores_int8_weights_and_shares_the_tied_matrix() -> None:
    model = tiny_model(vocab_size=64, block_size=16)
    q = quantized_copy(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert isinstance(q.transformer.wte, Int8Embedding) and q.transformer.wte.shared[0] is q.lm_head
    weights = [m.weight for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(weights) == 4 * model.config.n_layer + 1 and all(w.dtype == torch.int8 for w in weights)
    # what stays float: the position embedding, LayerNorm gains and biases
    assert [n for n, _ in q.named_parameters()] == [
        n for n, _ in model.named_parameters() if "wte" not in n and ".c_" not in n]
    # the embedding looks up the dequantized rows of the head's matrix
    idx = torch.tensor([[0, 5, 63]])
    torch.testing.assert_close(q.transformer.wte(idx), model.transformer.wte(idx), rtol=0, atol=0.02 / 127 * 4)


@pytest.mark.parametrize("path", kernels.CANDIDATES["int8"])
def test_quantized_logits_are_close_to_the_float_ones(path: str) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64)).eval()
    idx = torch.randint(0, 96, (3, 32), generator=torch.Generator().manual_seed(1))
    reference = model(idx).logits
    q = quantized_copy(model)
    with torch.inference_mode(), force(int8=path):
        logits = q(idx).logits
    assert logits.shape == reference.shape
    error = (logits - reference).abs().max().item()
    assert 0 < error < 0.03 * reference.abs().max().item(), error


def test_quantized_decoding_goes_through_the_measured_int8_product(monkeypatch: pytest.MonkeyPatch) -> None:
    used = []
    offered = set()

    def fastest(key, names, build, **kw):
        used.append(key[0])
        offered.update(names)
        return "int8 kernel" if key[0] == "int8 linear" else names[0]

    monkeypatch.setattr(chooser, "fastest", fastest)
    q = quantized_copy(tiny_model(vocab_size=64))
    generate(q, torch.tensor([[1, 2, 3]]), 3, temperature=0)
    assert "int8 linear" in used and "linear" not in used  # every product is an int8 one, chosen by measurement
    assert KEPT in offered  # ... among which the float product on a kept dequantized copy, so int8 never loses


def test_the_kept_float_copy_is_the_dequantized_product_and_is_freed_when_not_chosen() -> None:
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 96))
    x = torch.randn(1, 64)
    reference = F.linear(x, layer.weight.float() * layer.scales[:, None], layer.bias)
    with torch.inference_mode():
        with force(int8=KEPT):
            torch.testing.assert_close(layer(x), reference)  # float32 rounding only: the same products
        assert layer.float_copy.value is not None and layer.float_copy.value.dtype == torch.float32
        with force(int8="int8 kernel"):
            layer(x)
    assert layer.float_copy.value is None  # the copy costs memory only while a choice uses it


def test_a_quantized_model_is_not_saved(tmp_path: Path) -> None:
    with pytest.raises(GptlabError, match="cannot save an int8-quantized model"):
        save_model(quantized_copy(tiny_model()), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_sample_quantize_int8_generates_and_leaves_the_run_unchanged(tiny_run: Path, gptlab) -> None:
    before = digest(tiny_run)
    code, float_out, _ = gptlab("sample", str(tiny_run), "--prompt", "All:", "--max-new-tokens", "30",
                                "--temperature", "0")
    code_q, int8_out, err = gptlab("sample", str(tiny_run), "--prompt", "All:", "--max-new-tokens", "30",
                                   "--temperature", "0", "--quantize", "int8")
    assert code == code_q == 0, err
    assert int8_out.startswith("All:") and len(int8_out) == len(float_out)
    assert digest(tiny_run) == before
    assert load_model(tiny_run).transformer.wte.weight.dtype == torch.float32


def test_serve_quantize_int8_serves_the_quantized_model(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gptlab.serve.runner as runner
    from gptlab.cli import main

    served = {}

    class Server:  # uvicorn's, without the serving
        def __init__(self, config) -> None:
            pass

        def run(self, sockets) -> None:
            pass

    monkeypatch.setattr(runner, "bind", lambda host, port: None)
    monkeypatch.setattr(runner, "base_url", lambda sock: "http://127.0.0.1:0")
    monkeypatch.setattr(runner, "create_app", lambda model, *a, **k: served.setdefault("model", model))
    monkeypatch.setattr(runner.uvicorn, "Server", Server)
    monkeypatch.setattr(runner.uvicorn, "Config", lambda app, **kwargs: None)
    with force(int8_step="int8 weights"):  # the whole-step verdict pinned (tests/inference/test_quantize_step.py)
        assert main(["serve", str(tiny_run), "--quantize", "int8"]) == 0
    assert isinstance(served["model"].lm_head, Int8Linear)


def test_int8_linear_adds_the_bias_and_keeps_leading_dimensions() -> None:
    g = torch.Generator().manual_seed(0)
    values, scales = quantize_rows(torch.randn(48, 32, generator=g))
    bias = torch.randn(48, generator=g)
    x = torch.randn(2, 3, 32, generator=g)
    with torch.inference_mode(), force(int8="int8 kernel"):
        got = int8_linear(x, values, scales, bias)
    torch.testing.assert_close(got, F.linear(x, values.float() * scales[:, None], bias), rtol=0, atol=1e-5)
