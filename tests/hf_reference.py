"""Random GPT-2 checkpoints built by Hugging Face transformers: the independent reference for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

transformers.logging.set_verbosity_error()  # e.g. "bos_token_id outside the vocabulary" for odd vocabularies
transformers.logging.disable_progress_bar()  # save_pretrained's bar would land in the stderr tests inspect


def random_hf_gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    """A random GPT2LMHeadModel whose every parameter matters to its output.

    transformers initialises biases to 0 and LayerNorm gains to 1, which would leave a swapped or
    dropped bias undetected, and its weights are so small that the GELU acts almost linearly (an
    exact-erf GELU would then pass a 1e-5 test). So: larger weights, every 1-D parameter shifted,
    stronger positions and a weaker token embedding, which also keeps greedy decoding from locking
    onto one token.
    """
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(initializer_range=0.1, **config))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
        model.transformer.wpe.weight.mul_(5.0)
        model.transformer.wte.weight.mul_(0.3)
    return model.eval()


def save_hf_gpt2(directory: Path, seed: int = 0, **config) -> GPT2LMHeadModel:
    """`random_hf_gpt2` written with `save_pretrained`, returned as read back by transformers (eager attention)."""
    random_hf_gpt2(seed, **config).save_pretrained(directory)
    return load_hf(directory)


def load_hf(directory: Path) -> GPT2LMHeadModel:
    """The reference reads with the textbook attention, not a fused kernel."""
    return GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
