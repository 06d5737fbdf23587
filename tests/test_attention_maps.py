"""Attention heatmaps: the weights drawn are causal and normalised, and the image is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gptlab.attention_maps import attention_map, attention_weights, plot_attention, token_labels
from gptlab.checkpoint import load_model
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.tokenizers import GPT2Tokenizer, load_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPT = "All:\nSpeak, speak."


def assert_causal_and_normalised(weights: np.ndarray) -> None:
    T = weights.shape[-1]
    assert weights.shape[-2:] == (T, T)
    assert np.all(weights[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)  # no future
    assert np.allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(weights >= 0)


@pytest.mark.slow
@pytest.mark.parametrize("head", [None, 1])
def test_drawn_weights_are_causal_rows_that_sum_to_one(tiny_run: Path, tmp_path: Path, head: int | None) -> None:
    model, tokenizer = load_model(tiny_run), load_tokenizer(tiny_run)
    amap = attention_map(model, tokenizer, PROMPT, layer=1, head=head)
    T = len(PROMPT)  # one token per character
    assert amap.weights.shape == ((2, T, T) if head is None else (1, T, T))
    assert amap.heads == ([0, 1] if head is None else [1]) and amap.layer == 1
    assert_causal_and_normalised(amap.weights)
    assert amap.weights[:, 0, 0] == pytest.approx(1.0)  # the first token can only look at itself
    out = plot_attention(amap, tmp_path / "map.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5_000


def test_the_weights_reproduce_each_layers_attention_output(tiny_run: Path) -> None:
    """weights @ V equals what every layer's attention hands its output projection: they are the model's."""
    import torch

    model, tokenizer = load_model(tiny_run), load_tokenizer(tiny_run)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    mixed, values = [], []
    hooks = []
    for block in model.transformer.h:
        hooks.append(block.attn.c_proj.register_forward_pre_hook(lambda _m, args: mixed.append(args[0])))
        hooks.append(block.attn.c_attn.register_forward_hook(lambda _m, _i, out: values.append(out)))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    B, T = ids.shape
    nh, C = model.config.n_head, model.config.n_embd
    for layer, weights in enumerate(attention_weights(model, ids)):
        assert weights.shape == (1, nh, T, T)
        assert torch.allclose(weights.sum(-1), torch.ones(1, nh, T), atol=1e-6) and torch.all(weights.triu(1) == 0)
        v = values[layer][..., 2 * C:].view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        expected = mixed[layer].view(B, T, nh, C // nh).transpose(1, 2)
        torch.testing.assert_close(weights @ v, expected, rtol=0, atol=1e-5)
    expected = attention_weights(model, ids)[0][0, 1].numpy()  # layer 0, head 1
    assert np.array_equal(attention_map(model, tokenizer, PROMPT, layer=0, head=1).weights[0], expected)


def test_labels_make_blanks_visible() -> None:
    tok = GPT2Tokenizer()
    labels = token_labels(tok, tok.encode("Hello world\n"))
    assert labels == ["Hello", "\u2423world", "\\n"]


def test_cli_writes_the_image(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "heads.png"
    code = main(["attention", str(tiny_run), "--prompt", PROMPT, "--layer", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {out}: layer 1, all 2 heads, {len(PROMPT)} tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "2"], "--layer must be between 0 and 1"),
        (["--head", "-1"], "--head must be between 0 and 1"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "a" * 33], "more than the model's context of 32"),
        (["--out", "/nonexistent-dir/x.png"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args, message) -> None:
    options = {"--prompt": "All:", "--out": str(tmp_path / "x.png"), **dict(zip(args[::2], args[1::2]))}
    assert main(["attention", str(tiny_run), *[item for pair in options.items() for item in pair]]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_library_refuses_a_bad_layer(tiny_run: Path) -> None:
    with pytest.raises(GptlabError, match="--layer"):
        attention_map(load_model(tiny_run), load_tokenizer(tiny_run), PROMPT, layer=-1)


@pytest.mark.slow
def test_cli_never_replaces_an_existing_file_unasked(tiny_run: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "thesis.pdf"
    mine.write_bytes(b"%PDF my thesis")
    code = main(["attention", str(tiny_run), "--prompt", PROMPT, "--out", str(mine)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert mine.read_bytes() == b"%PDF my thesis"
    code = main(["attention", str(tiny_run), "--prompt", PROMPT, "--out", str(tmp_path / "notes.txt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not an image format" in err
    assert main(["attention", str(tiny_run), "--prompt", PROMPT, "--out", str(mine), "--overwrite"]) == 0
    assert mine.read_bytes()[:4] == b"%PDF" and mine.stat().st_size > 1000
