"""The model: shapes, causality, the two attention paths, GPT-2 initialisation, learning."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model

from gptlab.config import GPTConfig, model_preset
from gptlab.errors import GptlabError
from gptlab import generate, kernels
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


def test_model_py_imports_nothing_above_it() -> None:
    import ast
    import gptlab.model

    tree = ast.parse(open(gptlab.model.__file__).read())
    local = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert local == {"config", "kernels"}
