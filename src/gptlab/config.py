"""Model and training configuration, and the named presets.

`GPTConfig` describes the network: what a checkpoint needs to be rebuilt. The GPT-2 sizes and the small
CPU sizes are plain dictionaries of overrides, readable at a glance. (One training run is described by
`gptlab.train.config.TrainConfig`; what the server accepts, by `gptlab.serve.limits.ServerLimits`.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import GptlabError


@dataclass
class GPTConfig:
    """The shape of a GPT-2 network. Field names follow nanoGPT; `checkpoint` maps them to HF's."""

    vocab_size: int = 50257
    block_size: int = 1024  # the context length, HF's n_positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm; False is a gptlab-only option
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GptlabError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise GptlabError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The published GPT-2 sizes (Radford et al. 2019, Table 2, with the released vocabulary and context).
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# Small shapes for a laptop CPU; vocab_size and block_size come from the data and the run.
SMALL_SIZES: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384),
}


def model_preset(name: str, **overrides: Any) -> GPTConfig:
    """A `GPTConfig` for a named size; GPT-2 sizes come with GPT-2's vocabulary and context."""
    if name in GPT2_SIZES:
        base: dict[str, Any] = dict(vocab_size=50257, block_size=1024, **GPT2_SIZES[name])
    elif name in SMALL_SIZES:
        base = dict(SMALL_SIZES[name])
    else:
        known = ", ".join([*GPT2_SIZES, *SMALL_SIZES])
        raise GptlabError(f"unknown model size {name!r}; known sizes: {known}")
    base.update(overrides)
    return GPTConfig(**base)
