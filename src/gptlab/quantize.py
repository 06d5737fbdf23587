"""Weight-only int8 quantization: a model transform that stores every linear layer's weight as int8,
and the check that int8 pays where it runs.

The products such layers compute through are kernels (`gptlab.kernels.int8`); this module rewrites the
model, and `quantize_int8_where_faster` (what `--quantize int8` runs) keeps the float weights where a
whole int8 decoding step, measured here, is not faster than a float one.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import chooser, int8_linear
from .kernels.int8 import FBGEMM, FloatCopy
from .kernels.products import fbgemm_engine

INT8, FLOAT = "int8 weights", "float weights"
STEP_ROUNDS = 9  # interleaved decoding steps of each at least; the median step counts
STEP_BUDGET_SECONDS = 1.0  # ... and more while the figures spread, until the comparison has taken this long
log = logging.getLogger("gptlab.quantize")
chooser.CANDIDATES["int8_step"] = (INT8, FLOAT)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Weight-only int8, in place: every linear layer's weight becomes int8 with one float scale per
    output channel (its largest magnitude / 127), the activations stay in float. Returns `model`.

    Decoding reads every weight once per step, so a quarter of float32's bytes reads up to four times
    faster where memory is the limit. Where torch's int8 products lose to the float product (they are
    arithmetic-bound on some CPUs), a layer keeps a float copy of its dequantized weight and multiplies
    by that: it then saves no memory, but its product is never slower than the float one
    (`quantize_int8_where_faster` checks the whole step). An embedding whose matrix a linear layer
    shares (GPT-2's tied token embedding and LM head) shares the int8 matrix too and looks up
    dequantized rows. Quantize a
    model for inference, after moving it to its device and dtype; the files it was loaded from are not
    touched, and `save_model` refuses a quantized model.
    """
    _quantize(model)
    return model


def quantize_int8_where_faster(model: nn.Module) -> bool:
    """`quantize_int8(model)` where a decoding step with int8 weights runs faster here than one with the
    model's float weights; else the model keeps its float weights (said once per process). Returns
    whether the model is now int8.

    Each layer already takes the fastest of its int8 products (or its kept float copy), but a step is
    more than its products, and on some CPUs every int8 product loses (they are arithmetic-bound), so
    the whole step decides: a forward pass of one token at batch 1 (every weight read once, as in
    decoding) through each variant, at one thread and at torch's count (inference adapts its count to
    the load, and the variant that wins at the count a step will run at is the one that pays), after
    one pass each that makes the layers' own choices, in interleaved rounds, the median step of each
    counting; the variant of the fastest (`chooser.fastest`: guarded, cached per machine with its
    reason, budgeted) is kept. Under GPTLAB_KERNELS=plain nothing is measured and the model
    is int8, as asked; `kernels.force(int8_step=...)` pins the verdict. Both variants are held while
    they are compared; the loser is dropped.
    """
    replaced = _quantize(model)
    if not replaced:
        return True
    config = getattr(model, "config", None)
    weight = next(iter(replaced.values()))[0].weight
    key = ("int8 decoding step", type(model).__name__, *(
        getattr(config, name, None) for name in ("n_layer", "n_head", "n_embd", "vocab_size")),
        str(weight.dtype), str(weight.device), torch.get_num_threads(), "batch 1",
        *([FBGEMM] if fbgemm_engine() else []))  # a verdict reached without fbgemm's product is reached again
    idx = torch.zeros((1, 1), dtype=torch.long, device=weight.device)  # (B, T): one token
    threads = torch.get_num_threads()
    # the thread counts a step may run at: inference adapts its count to the load (gptlab.threads), and on a
    # busy machine a step's parallel regions stall at two threads where one runs freely
    counts = sorted({1, threads}) if weight.device.type == "cpu" else [threads]
    names = {f"{variant} at {n} thread{'s' * (n > 1)}": (variant, n) for variant in (INT8, FLOAT) for n in counts}

    def use(variant: str) -> None:
        for name, (float_module, int8_module) in replaced.items():
            _replace_module(model, name, int8_module if variant == INT8 else float_module)

    def build(name: str):
        variant, n = names[name]

        def step() -> object:
            use(variant)
            torch.set_num_threads(n)
            try:
                return model(idx)
            finally:
                torch.set_num_threads(threads)
        return step

    def reason(record: dict) -> str:
        medians = {**record.get("dropped", {}), **record["seconds"]}
        figures = ", ".join(f"{name} {medians[name] * 1e3:.3g} ms" for name in names if name in medians)
        why = "; ".join(f"{name} raised {cause}" for name, cause in record.get("unavailable", {}).items())
        return (f"a decoding step at batch 1: {figures} (median of {record['rounds']} interleaved rounds"
                f"{'; ' + why if why else ''}); {record['choice']} fastest")

    choice = chooser.forced("int8_step")
    if choice is None:
        training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                fastest = chooser.fastest(key, tuple(names), build, plain=INT8, rounds=STEP_ROUNDS,
                                          budget=STEP_BUDGET_SECONDS, reason=reason)
        finally:
            model.train(training)
        choice = names[fastest][0] if fastest in names else fastest
    use(choice)
    if choice == FLOAT:
        recorded = chooser.entry(key) or {}
        message = (f"--quantize int8: int8 weights decode no faster than {str(weight.dtype).removeprefix('torch.')} "
                   f"ones on this machine ({recorded.get('reason', 'pinned by kernels.force')}): keeping the float weights")
        chooser.warn_once(log, message)
    return choice == INT8


def _quantize(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """`quantize_int8`'s work: each replaced module's name -> (its float module, its int8 one)."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    by_weight = {}
    replaced = {}
    for name, module in linears:
        quantized = Int8Linear.from_linear(module)
        by_weight[id(module.weight)] = quantized
        replaced[name] = (module, quantized)
        _replace_module(model, name, quantized)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding) and id(module.weight) in by_weight:
            embedding = Int8Embedding(by_weight[id(module.weight)])
            replaced[name] = (module, embedding)
            _replace_module(model, name, embedding)
    return replaced


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
