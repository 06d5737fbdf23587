"""The model: shapes, causality, the two attention paths, GPT-2 initialisation, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_compile, tiny_model

from gptlab.config import GPTConfig, model_preset
from gptlab.errors import GptlabError
from gptlab import generate, kernels
from gptlab.inference.cache import SlotCache
from gptlab.kernels import attention_path, gelu, matvec_rows, row_blocks_pay, sigmoid_form_gelu
from gptlab.model import GPT


def test_output_shapes_and_loss() -> None:
    model = tiny_model(vocab_size=50, block_size=16)
    idx = torch.randint(0, 50, (3, 16))
    out = model(idx)
    assert out.logits.shape == (3, 16, 50)
    assert out.loss is None
    out = model(idx, targets=torch.randint(0, 50, (3, 16)))
    assert out.loss.shape == ()
    # an untrained model predicts close to uniformly: loss near ln(vocab) for unrelated targets
    assert abs(out.loss.item() - math.log(50)) < 0.3


def test_loss_ignores_minus_100_targets() -> None:
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -100
    full = torch.nn.functional.cross_entropy(model(idx).logits[:, 4:].reshape(-1, 50), idx[:, 4:].reshape(-1))
    assert torch.allclose(model(idx, targets).loss, full, atol=1e-6)


def test_longer_than_context_is_refused() -> None:
    model = tiny_model(block_size=8)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("path", kernels.ATTENTION_PATHS)
def test_causality(path: str) -> None:
    """Changing the token at position t+1 leaves the logits at positions <= t unchanged."""
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 50, (2, 16))
    with kernels.force(attention=path):
        base = model(idx).logits
        for t in (0, 5, 14):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
            logits = model(changed).logits
            assert torch.equal(logits[:, : t + 1], base[:, : t + 1])
            assert not torch.allclose(logits[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("T", [16, 300])
def test_sdpa_and_explicit_attention_agree_forward_and_backward(T: int) -> None:
    model = tiny_model(block_size=T).train()  # dropout is 0: both paths are deterministic
    idx = torch.randint(0, 50, (3, T), generator=torch.Generator().manual_seed(T))
    results = []
    for path in ("fused", "textbook"):
        model.zero_grad()
        with kernels.force(attention=path):
            out = model(idx, idx)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (fused, fused_grads), (textbook, textbook_grads) = results
    torch.testing.assert_close(textbook, fused, rtol=0, atol=1e-5)
    for a, b in zip(textbook_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_default_attention_path_is_the_faster_one_for_the_device() -> None:
    assert attention_path(torch.zeros(1, 2, 64, 8, dtype=torch.bfloat16)) == "textbook"
    assert attention_path(torch.zeros(1, 2, 64, 8)) == "fused"  # float32: the fused kernel


def test_bfloat16_on_a_cpu_takes_the_textbook_attention_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """There the formula's bf16 products beat the fused kernel; the numbers are float32's up to bf16 rounding."""
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = model(idx).logits

    def fused(*args, **kwargs):
        raise AssertionError("the fused attention kernel was called")

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx).logits
    assert logits.dtype == torch.bfloat16
    error = (logits.float() - reference).abs().max().item()
    assert error < 0.02 * reference.abs().max().item(), error


def test_the_sigmoid_form_is_the_tanh_gelu_forward_and_backward() -> None:
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64, requires_grad=True)
    expected = F.gelu(x, approximate="tanh")
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    got = sigmoid_form_gelu(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)
    erf = F.gelu(x)  # the control: the exact GELU is a different function at this tolerance
    assert (erf - expected).abs().max().item() > 1e-4


@needs_compile()
def test_a_compiled_gelu_takes_the_sigmoid_form(monkeypatch: pytest.MonkeyPatch) -> None:
    traced = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        traced.append(x.shape)
        return sigmoid_form_gelu(x)

    monkeypatch.setattr(kernels, "sigmoid_form_gelu", counting)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    eager = gelu(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    assert traced == []  # eager mode: torch's own tanh kernel
    compiled = torch.compile(gelu)(x)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), x)
    assert traced == [x.shape]
    # float32's default tolerances: a different formula rounds differently (the math is pinned above)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_gpt2_initialisation_statistics() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config)
    sd = dict(model.named_parameters())
    assert sd["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["transformer.h.1.mlp.c_fc.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    assert sd["transformer.h.2.attn.c_proj.weight"].std().item() == pytest.approx(residual_std, rel=0.05)
    assert sd["transformer.h.3.mlp.c_proj.weight"].std().item() == pytest.approx(residual_std, rel=0.05)
    assert sd["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["transformer.wpe.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    for name, p in sd.items():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        if ".ln_" in name and name.endswith(".weight"):
            assert torch.all(p == 1), name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_sizes_have_the_published_parameter_counts() -> None:
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168}
    for name, count in expected.items():
        with torch.device("meta"):
            model = GPT(model_preset(name))
        assert model.num_parameters() == count


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(GptlabError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(GptlabError, match="vocab_size must be a positive integer"):
        GPTConfig(vocab_size=0)
    with pytest.raises(GptlabError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(GptlabError, match="unknown model size"):
        model_preset("gpt5")


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=64)).train()
    idx = torch.randint(0, 32, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        loss = model(x, y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_dropout_is_active_only_in_training() -> None:
    model = tiny_model(dropout=0.5)
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(model.eval()(idx).logits, model(idx).logits)
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)


def test_generate_shape_and_greedy_is_deterministic() -> None:
    model = tiny_model(block_size=8)
    idx = torch.randint(0, 50, (2, 5))
    out = generate(model, idx, max_new_tokens=12, temperature=0)  # runs past the context of 8
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :5], idx)
    assert torch.equal(out, generate(model, idx, max_new_tokens=12, temperature=0))


def test_crop_block_size_keeps_the_first_positions() -> None:
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 50, (1, 8))
    before = model(idx).logits
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape[0] == 8
    assert torch.allclose(model(idx).logits, before)


# --- decoding's matrix-vector products ------------------------------------------------------------


@pytest.fixture
def threads():
    """Set torch's thread count for one test (the suite runs on one thread, see conftest)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("rows", [1, 2, 4, 7])
def test_matvec_rows_equals_f_linear(threads, n_threads: int, rows: int) -> None:
    threads(n_threads)
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(1001, 300, generator=g)  # 1001 rows: a remainder for 2 and for 3 threads
    bias = torch.randn(1001, generator=g)
    x = torch.randn(rows, 1, 300, generator=g)  # (B, T, in) as a decoding step has it
    with torch.inference_mode():
        for b in (bias, None):
            got = matvec_rows(x, weight, b)
            assert got.shape == (rows, 1, 1001)
            torch.testing.assert_close(got, F.linear(x, weight, b), rtol=0, atol=1e-4)


def test_row_blocks_are_used_for_float32_decoding_on_several_threads_only(threads) -> None:
    weight = torch.zeros(1024, 256)  # 2**18 entries
    one_row = torch.zeros(1, 1, 256)
    threads(2)
    with torch.inference_mode():
        assert row_blocks_pay(one_row, weight)
        assert row_blocks_pay(torch.zeros(8, 256), weight)
        assert not row_blocks_pay(torch.zeros(9, 256), weight)  # a batch BLAS handles well itself
        assert not row_blocks_pay(one_row, weight[:1000])  # a small matrix: the split costs more than it saves
        assert not row_blocks_pay(one_row.bfloat16(), weight.bfloat16())  # bf16 kernels are threaded already
    assert not row_blocks_pay(one_row, weight)  # autograd on: training keeps F.linear
    threads(1)
    with torch.inference_mode():
        assert not row_blocks_pay(one_row, weight)


def test_decoding_through_row_blocks_matches_the_uncached_model(threads) -> None:
    """A model big enough for the row-block path, on 2 threads: the cache still gives the plain logits."""
    threads(2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1101, block_size=24, n_layer=2, n_head=4, n_embd=256)).eval()
    seq = torch.randint(0, 1101, (6, 24), generator=torch.Generator().manual_seed(3))
    expected = model(seq).logits  # (B, T, V)
    for rows in (1, 2, 6):
        cache = SlotCache(model.config, device=torch.device("cpu"), dtype=torch.float32)
        cache.ensure(rows, 24)
        with torch.inference_mode():
            assert row_blocks_pay(torch.zeros(rows, 1, 256), model.lm_head.weight)
            got = [model.lm_head(model.hidden_states(seq[:rows, :3], cache.prefill(0, rows))[:, -1])]
            got += [model.lm_head(model.hidden_states(seq[:rows, t : t + 1], cache.decode([t] * rows))[:, -1])
                    for t in range(3, 24)]
        torch.testing.assert_close(torch.stack(got, 1), expected[:rows, 2:], rtol=0, atol=1e-5)


def test_the_old_method_names_still_work_and_say_what_replaces_them(tmp_path) -> None:
    model = tiny_model(block_size=8)
    idx = torch.randint(0, 50, (1, 3))
    with pytest.warns(DeprecationWarning, match=r"gptlab.generate\("):
        out = model.generate(idx, 4, temperature=0)
    assert torch.equal(out, generate(model, idx, 4, temperature=0))
    with pytest.warns(DeprecationWarning, match=r"gptlab.save_model"):
        model.save_pretrained(tmp_path)
    with pytest.warns(DeprecationWarning, match=r"gptlab.load_model"):
        loaded = GPT.from_pretrained(tmp_path)
    assert torch.equal(loaded(idx).logits, model(idx).logits)


def test_model_py_imports_nothing_above_it() -> None:
    import ast
    import gptlab.model

    tree = ast.parse(open(gptlab.model.__file__).read())
    local = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert local == {"config", "kernels"}
