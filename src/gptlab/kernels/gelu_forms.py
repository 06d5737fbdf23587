"""GPT-2's GELU: torch's tanh GELU kernel (the plain path), or the same function as x * sigmoid(2u).

In a compiled graph each becomes one fused loop, on tanh or on exp; the choice there is made by timing
those two functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import chooser
from .chooser import bucket, dtype_named, synchronized


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, x * (1 + tanh(u)) / 2 with u = sqrt(2/pi) * (x + 0.044715 x^3), in its faster form."""
    form = chooser.forced("gelu")
    if form is None and torch.compiler.is_compiling():
        form = _compiled_gelu_form(str(x.dtype), str(x.device))
    elif form is None:
        form = gelu_form(bucket(x.numel()), str(x.dtype), str(x.device), torch.is_grad_enabled() and x.requires_grad)
    return GELU_FORMS[form](x)


def gelu_form(n: int, dtype: str, device: str, grad: bool) -> str:
    """The faster of GELU_FORMS in eager mode on n elements, measured once.

    torch's GELU is one kernel; the sigmoid form is several passes over memory, but on exp instead of
    tanh, which some CPUs evaluate several times faster.
    """
    key = ("gelu", n, dtype, device, grad)
    known = chooser.known(key)
    if known is not None:
        return known
    where = torch.device(device)
    x = functools.cache(lambda: torch.randn(n, generator=torch.Generator().manual_seed(0))
                        .to(where, dtype_named(dtype)).requires_grad_(grad))

    def build(form: str) -> Callable[[], object]:
        def once() -> object:
            y = GELU_FORMS[form](x())
            return torch.autograd.grad(y, x(), y) if grad else y
        return synchronized(once, where)

    return chooser.fastest(key, tuple(GELU_FORMS), build, plain="tanh")


@torch.compiler.assume_constant_result
def _compiled_gelu_form(dtype: str, device: str) -> str:
    """The GELU form for a compiled graph, run eagerly while torch.compile traces.

    There either form becomes one fused loop whose cost is its transcendental function, tanh or exp
    (as sigmoid), so the faster of torch's tanh and sigmoid, timed on a tensor that stays in cache,
    decides.
    """
    where = torch.device(device)
    x = functools.cache(lambda: torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)).to(where, dtype_named(dtype)))

    def build(form: str) -> Callable[[], object]:
        function = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}[form]
        return synchronized(lambda: function(x()), where)

    return chooser.fastest(("compiled gelu", dtype, device), tuple(GELU_FORMS), build, plain="tanh")


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def sigmoid_form_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU as x * sigmoid(2u), since (1 + tanh(u)) / 2 = sigmoid(2u); 2u = x * (a + b x^2)."""
    return x * torch.sigmoid(x * (_GELU_LINEAR + _GELU_CUBIC * x * x))


_GELU_LINEAR = 2 * math.sqrt(2 / math.pi)
_GELU_CUBIC = _GELU_LINEAR * 0.044715
GELU_FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"tanh": tanh_gelu, "sigmoid": sigmoid_form_gelu}
chooser.CANDIDATES["gelu"] = tuple(GELU_FORMS)
