"""Attention heatmaps: which earlier tokens each position of a prompt reads from.

The weights are softmax(Q K^T / sqrt(d) + M) computed from the queries and keys each layer's projection
actually produces (caught by a forward hook on `c_attn`), the matrix a fused attention kernel never
materialises; a test checks that they reproduce the layer's attention output.
Figures are drawn on matplotlib's Agg canvas directly: no display, no global pyplot state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import GptlabError
from .fileio import atomic_write
from .inference.modes import eval_mode
from .model import GPT
from .tokenizers import Tokenizer


@dataclass
class AttentionMap:
    """What one figure shows: weights (heads, T, T) of one layer, rows = queries, columns = keys."""

    layer: int
    heads: list[int]
    labels: list[str]
    weights: np.ndarray  # (len(heads), T, T)


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text, with blanks made visible so a space or newline token has a label."""
    return [tokenizer.decode([i]).replace(" ", "\u2423").replace("\n", "\\n").replace("\t", "\\t") for i in ids]


def attention_map(
    model: GPT, tokenizer: Tokenizer, prompt: str, *, layer: int = 0, head: int | None = None
) -> AttentionMap:
    """The attention weights of `prompt` at `layer`, for one head or (head None) all of them."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    if not 0 <= layer < n_layer:
        raise GptlabError(f"--layer must be between 0 and {n_layer - 1} (the model has {n_layer} layers), got {layer}")
    if head is not None and not 0 <= head < n_head:
        raise GptlabError(f"--head must be between 0 and {n_head - 1} (the model has {n_head} heads), got {head}")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise GptlabError("the prompt is empty; give some text to look at")
    if len(ids) > model.config.block_size:
        raise GptlabError(f"the prompt is {len(ids)} tokens, more than the model's context of {model.config.block_size}")
    device = next(model.parameters()).device
    with eval_mode(model):
        weights = attention_weights(model, torch.tensor([ids], device=device))[layer][0]  # (nh, T, T)
    heads = list(range(n_head)) if head is None else [head]
    return AttentionMap(layer, heads, token_labels(tokenizer, ids), weights[heads].float().cpu().numpy())


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention weights (B, nh, T, T) of the prompt `idx` (B, T)."""
    projections: list[torch.Tensor] = []
    hooks = [block.attn.c_attn.register_forward_hook(lambda _m, _i, out: projections.append(out))
             for block in model.transformer.h]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    B, T = idx.shape
    nh, hs = model.config.n_head, model.config.head_dim
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
    weights = []
    for qkv in projections:  # (B, T, 3C)
        q, k, _ = (t.view(B, T, nh, hs).transpose(1, 2).float() for t in qkv.split(nh * hs, dim=2))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))  # (B, nh, T, T)
        weights.append(scores.softmax(-1))
    return weights


def plot_attention(amap: AttentionMap, out: str | Path, *, overwrite: bool = False) -> Path:
    """Draw one heatmap per head in a near-square grid and save it (format from the file suffix).

    An existing file is replaced only with `overwrite`: the path may name someone's own document.
    """
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise GptlabError(f"--out {out}: the directory {out.parent} does not exist")
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    image_format = out.suffix.lstrip(".").lower()
    if image_format not in formats:
        raise GptlabError(f"--out {out}: {out.suffix or 'no suffix'} is not an image format; use .png, .svg or .pdf")
    if out.is_dir():
        raise GptlabError(f"--out {out} is a directory; name the image file to write")
    if out.exists() and not overwrite:
        raise GptlabError(f"--out {out} already exists; pass --overwrite to replace it")
    n = len(amap.heads)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    T = len(amap.labels)
    panel = max(3.0, 0.22 * T)  # inches: enough room for one readable label per token
    fontsize = max(3.0, min(9.0, 220.0 / T))
    fig = Figure(figsize=(cols * panel + 1.2, rows * panel + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    future = np.triu(np.ones((T, T), dtype=bool), 1)  # drawn blank: causal attention never looks there
    image = None
    for ax, head, weights in zip(axes.flat, amap.heads, amap.weights):
        image = ax.imshow(np.ma.masked_array(weights, future), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {amap.layer}, head {head}", fontsize=10)
        ax.set_xticks(range(T), amap.labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(T), amap.labels, fontsize=fontsize)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    atomic_write(out, lambda handle: fig.savefig(handle, format=image_format, dpi=120))
    return out
