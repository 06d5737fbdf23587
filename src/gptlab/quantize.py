"""Weight-only int8 quantization: a model transform that stores every linear layer's weight as int8.

The products such layers compute through are kernels (`gptlab.kernels.int8`); this module only
rewrites the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import int8_linear
from .kernels.int8 import FloatCopy


def quantize_int8(model: nn.Module) -> nn.Module:
    """Weight-only int8, in place: every linear layer's weight becomes int8 with one float scale per
    output channel (its largest magnitude / 127), the activations stay in float. Returns `model`.

    Decoding reads every weight once per step, so a quarter of float32's bytes reads up to four times
    faster where memory is the limit. Where torch's int8 products lose to the float product (they are
    arithmetic-bound on some CPUs), a layer keeps a float copy of its dequantized weight and multiplies
    by that: it then saves no memory, but int8 is never slower than float. An embedding whose matrix a linear layer shares (GPT-2's tied
    token embedding and LM head) shares the int8 matrix too and looks up dequantized rows. Quantize a
    model for inference, after moving it to its device and dtype; the files it was loaded from are not
    touched, and `save_model` refuses a quantized model.
    """
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    by_weight = {}
    for name, module in linears:
        quantized = Int8Linear.from_linear(module)
        by_weight[id(module.weight)] = quantized
        _replace_module(model, name, quantized)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding) and id(module.weight) in by_weight:
            _replace_module(model, name, Int8Embedding(by_weight[id(module.weight)]))
    return model


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values and (out,) float32 scales, weight ~= values * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)  # (out,)
    values = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return values, scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 rows with float scales; it computes through
    `int8_linear`. Inference only: it holds buffers, not parameters."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,)
        self.register_buffer("bias", bias)  # (out,) or None
        self.float_copy = FloatCopy()  # the dequantized weight, held only while a measured choice uses it

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        values, scales = quantize_rows(linear.weight)
        dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(values, scales.to(dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales, self.bias, self.float_copy)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """The rows of an `Int8Linear`'s weight, dequantized, looked up by token id (a tied embedding)."""

    def __init__(self, shared: Int8Linear) -> None:
        super().__init__()
        self.shared = [shared]  # a plain list: the matrix belongs to the linear layer, not twice to the model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        linear = self.shared[0]
        return F.embedding(idx, linear.weight).to(linear.scales.dtype) * linear.scales[idx].unsqueeze(-1)
