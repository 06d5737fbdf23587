"""GPT-2, from torch primitives, readable top to bottom like the paper.

Radford et al. (2019) keep GPT-1's decoder-only transformer and move LayerNorm to the input of each
sub-block (pre-LN), add a final LayerNorm, and scale the residual projections at initialisation by
1/sqrt(N) where N is the number of residual layers. Everything below is that, and nothing else: how
each operation runs fastest on the device is `kernels`' business, and a KV cache is any object that
keeps keys and values between calls (the `Cache` protocol below), owned by whoever decodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .kernels import Linear, attention, gelu


class LayerCache(Protocol):
    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keep this call's keys and values (B, nh, T, hs); return every key and value its T queries may
        see, (B, nh, S, hs) each, and a bool mask broadcastable to (B, nh, T, S), True where a query may
        attend, or None for causal with the queries at the end (query t sees keys 0 .. S - T + t)."""
        ...


class Cache(Protocol):
    """Keys and values kept between forward passes, so decoding pays for one new position per token.

    The model calls `positions` once per forward pass, then `layer(i).update` in every layer; it never
    advances the cache: the caller does, once the pass is over.
    """

    def positions(self, T: int) -> torch.Tensor:
        """Position ids of the T new tokens: (T,), or (B, T) when rows sit at different positions."""
        ...

    def layer(self, index: int) -> LayerCache: ...


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None = None  # mean cross-entropy over the targets that are not ignored


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees only positions <= t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        # one fused projection for queries, keys and values, as in GPT-2's c_attn
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(k, v)  # (B, nh, S, hs): the cached positions, then these
        y = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, four times wider than the residual stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))  # (B, T, C); GPT-2's GELU is the tanh one


class Block(nn.Module):
    """One pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """The GPT-2 language model: embeddings, a stack of blocks, a final LayerNorm, a tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned positions
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2 scales the weights of layers that write into the residual stream by 1/sqrt(N),
        # N = 2 * n_layer residual additions, so the stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, the tied matrix counted once; optionally without the embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final states, before the LM head.

        Callers that need logits at a few positions only (the last one when decoding, the scored ones
        when evaluating) apply `lm_head` to those: at GPT-2's vocabulary the head is the largest matrix.
        With a cache the tokens follow what it holds, and their keys and values are added to it.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} exceeds the context of {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            pos = cache.positions(T)  # (T,) or (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layer(i))  # (B, T, C)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: Cache | None = None
    ) -> ModelOutput:
        """Logits for every position; with `targets`, the mean cross-entropy (-100 ignored)."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
            )
        return ModelOutput(logits=logits, loss=loss)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to fine-tune a 1024-token GPT-2 with short windows on a CPU."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow the context from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight[:block_size].detach().clone())
        wpe.num_embeddings = block_size
