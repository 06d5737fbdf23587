"""GPT-2, from torch primitives, readable top to bottom like the paper.

Radford et al. (2019) keep GPT-1's decoder-only transformer and move LayerNorm to the input of each
sub-block (pre-LN), add a final LayerNorm, and scale the residual projections at initialisation by
1/sqrt(N) where N is the number of residual layers. Everything below is that, and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .linear import Linear, matvec_rows, row_blocks_pay


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None = None  # mean cross-entropy over the targets that are not ignored


class KVCache:
    """Every layer's keys and values, allocated once for a whole generation, filled slot by slot.

    Generation then costs one position per new token instead of the whole context. Rows of a batch
    may be left-padded so that prompts of different lengths decode together: row b's first `pad[b]`
    slots hold no token, no query attends to them, and positions count from the row's first real
    token, so each row computes what it would compute alone.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, capacity: int, *,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 1 <= capacity <= config.block_size:
            raise ValueError(f"cache capacity must be in [1, {config.block_size}], got {capacity}")
        shape = (config.n_layer, batch_size, config.n_head, capacity, config.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (L, B, nh, S, hs)
        self.values = torch.empty(shape, device=device, dtype=dtype)  # (L, B, nh, S, hs)
        self.length = 0  # slots filled so far, the same for every row
        self.pad: torch.Tensor | None = None  # (B,) padding slots per row; None when no row is padded
        self.mask: torch.Tensor | None = None  # the attention mask of the forward pass in progress
        self._slots = torch.arange(capacity, device=device)  # (S,)
        self._key_valid: torch.Tensor | None = None  # (B, 1, 1, S): False on padding slots

    @property
    def capacity(self) -> int:
        return self.keys.size(3)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Empty the cache for new rows, row b starting with `pad[b]` padding slots."""
        self.length = 0
        self.pad = pad if pad is not None and bool(pad.any()) else None
        if self.pad is None:
            self._key_valid = None
        else:
            self._key_valid = (self._slots >= self.pad[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (e.g. sequences that finished), keeping the others' contents."""
        length = self.length
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        self.reset(None if self.pad is None else self.pad.index_select(0, rows))
        self.length = length

    def positions(self, T: int) -> torch.Tensor:
        """Position ids of the next T slots: (T,) when no row is padded, else (B, T)."""
        slots = self._slots[self.length : self.length + T]  # (T,)
        if self.pad is None:
            return slots
        return (slots - self.pad[:, None]).clamp_(min=0)  # (B, T); padding slots get position 0

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """Which cached keys each of the next T queries may see; None when the causal rule suffices."""
        start, end = self.length, self.length + T
        if self.pad is None and (start == 0 or T == 1):
            return None  # SDPA's is_causal covers it, or one query that sees everything before it
        if self.pad is not None and T == 1:
            return self._key_valid[..., :end]  # (B, 1, 1, end): a view, nothing allocated per step
        query, key = self._slots[start:end, None], self._slots[:end]
        causal = key <= query  # (T, end)
        if self.pad is None:
            return causal
        # a padding query may see itself only, so that its softmax row is never empty (NaN)
        return (self._key_valid[..., :end] & causal) | (key == query)  # (B, 1, T, end)


def textbook_attention_is_faster(q: torch.Tensor) -> bool:
    """True for bf16 on a CPU, where the textbook formula beats torch's fused causal kernel.

    That kernel gains nothing from bf16 on a CPU (its backward runs slower than in float32), while the
    formula's two products run at the bf16 matmul rate: forward and backward of one layer of the
    6-layer, 384-wide benchmark model take less than half as long on an AVX-512-bf16 CPU. In float32
    the two are within a few percent of each other there, and the fused kernel needs far less memory.
    """
    return q.dtype == torch.bfloat16 and q.device.type == "cpu"


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
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # None: whichever is faster on the device; False: the fused kernel; True: the textbook formula
        self.explicit: bool | None = None
        self.last_weights: torch.Tensor | None = None  # (B, nh, T, T), kept only when asked

    def forward(
        self, x: torch.Tensor, keep_weights: bool = False, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            y = self._cached_attention(q, k, v, cache, layer)
        elif keep_weights or (textbook_attention_is_faster(q) if self.explicit is None else self.explicit):
            y = self._explicit_attention(q, k, v, keep_weights)
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _explicit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_weights: bool
    ) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d_head) + M) V with M = -inf above the diagonal."""
        B, nh, T, hs = q.shape
        q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))  # (B*nh, T, hs): 3-D products run fastest
        mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)  # (T, T): M
        # one batched product scales and adds M: no separate passes over the scores
        scores = torch.baddbmm(mask.expand(B * nh, T, T), q, k.transpose(1, 2), alpha=1.0 / math.sqrt(hs))
        weights = F.softmax(scores, dim=-1)  # (B*nh, T, T), each row sums to 1
        self.last_weights = weights.detach().view(B, nh, T, T) if keep_weights else None
        return (self.attn_dropout(weights) @ v).view(B, nh, T, hs)

    @staticmethod
    def _cached_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int
    ) -> torch.Tensor:
        """Write this call's keys and values into the cache, then attend over everything cached."""
        start, end = cache.length, cache.length + q.size(-2)
        keys, values = cache.keys[layer], cache.values[layer]  # (B, nh, S, hs) views into the buffers
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        mask = cache.mask
        return F.scaled_dot_product_attention(
            q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, is_causal=mask is None and end - start > 1
        )  # (B, nh, T, hs)


class TanhGELU(nn.Module):
    """GPT-2's GELU: x * (1 + tanh(u)) / 2 with u = sqrt(2/pi) * (x + 0.044715 x^3).

    Since (1 + tanh(u)) / 2 = sigmoid(2u), a compiled graph gets the sigmoid form: torch.compile fuses
    it into one loop built on exp, which a CPU runs several times faster than tanh. Eager mode keeps
    torch's single GELU kernel, which beats the several passes the sigmoid form takes there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return sigmoid_form_gelu(x)
        return F.gelu(x, approximate="tanh")


def sigmoid_form_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU as x * sigmoid(2u); 2u = x * (a + b x^2)."""
    return x * torch.sigmoid(x * (_GELU_LINEAR + _GELU_CUBIC * x * x))


_GELU_LINEAR = 2 * math.sqrt(2 / math.pi)
_GELU_CUBIC = _GELU_LINEAR * 0.044715


class MLP(nn.Module):
    """Position-wise feed-forward network, four times wider than the residual stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = TanhGELU()  # GPT-2 was trained with the tanh approximation
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """One pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, keep_weights: bool = False, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), keep_weights, cache, layer)  # (B, T, C)
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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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

    def set_explicit_attention(self, explicit: bool | None = True) -> None:
        """Make every layer use the textbook formula (True), the fused SDPA kernel (False), or the faster
        of the two on the device (None, the default)."""
        for block in self.transformer.h:
            block.attn.explicit = explicit

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, keep_attention: bool = False
    ) -> ModelOutput:
        """Logits for every position; with `targets`, the mean cross-entropy (-100 ignored)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds the context of {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, keep_attention)  # (B, T, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
            )
        return ModelOutput(logits=logits, loss=loss)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """(B, T) tokens that follow the cache's contents -> (B, vocab_size) logits of the last one.

        Their keys and values are appended to `cache`. Only the last position goes through the LM
        head: generation never needs the others, and at GPT-2's vocabulary the head is the largest
        matrix of the network. For a few rows the head is `matvec_rows`; for more it is computed as
        W @ h^T, (V, C) @ (C, B): on CPU BLAS this tall, skinny product runs faster than h @ W^T.
        """
        T = idx.size(1)
        if cache.length + T > cache.capacity:
            raise ValueError(f"{T} more tokens overflow the cache ({cache.length}/{cache.capacity} slots used)")
        x = self.transformer.wte(idx) + self.transformer.wpe(cache.positions(T))  # (B, T, C)
        cache.mask = cache.attention_mask(T)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache=cache, layer=layer)  # (B, T, C)
        cache.mask = None
        cache.length += T
        h = self.transformer.ln_f(x[:, -1, :])  # (B, C)
        head = self.lm_head.weight  # (vocab_size, C)
        if row_blocks_pay(h, head):
            return matvec_rows(h, head)  # (B, vocab_size)
        return torch.mm(head, h.t()).t()  # (B, vocab_size)

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer attention weights, each (B, nh, T, T), computed with the explicit formula."""
        self.forward(idx, keep_attention=True)
        weights = [block.attn.last_weights for block in self.transformer.h]
        for block in self.transformer.h:
            block.attn.last_weights = None
        return weights

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context, e.g. to fine-tune a 1024-token GPT-2 with short windows on a CPU."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow the context from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight[:block_size].detach().clone())
        wpe.num_embeddings = block_size

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device: str | torch.device = "cpu") -> GPT:
        """A GPT in eval mode from a gptlab run, a Hugging Face GPT-2 directory, or "gpt2"..."gpt2-xl"."""
        from .checkpoint import load_model  # checkpoint imports this module

        return load_model(path_or_name, device)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face GPT-2 checkpoint; refuses options Hugging Face cannot represent."""
        from .checkpoint import save_model

        save_model(self, directory, require_hf=True)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, T) prompt ids -> (B, T + max_new_tokens); temperature 0 is greedy."""
        from .generation import generate

        return generate(
            self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator,
        )
