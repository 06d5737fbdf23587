"""Which torch device a name means, and the dtypes by their names: what train, sample, serve and eval all
resolve before they compute, so it sits low enough for each of them to reach.

What a device can do in a precision (bf16 in hardware, and how fast) is measured in precision.py; what a
training run needs on top (autocast, TF32, torch.compile, memory) is train/device.py's.
"""

from __future__ import annotations

import torch

from .errors import EnvironmentProblem, GptlabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The torch device `name` names: auto, cpu, cuda, cuda:N or mps; one that this machine lacks is an
    EnvironmentProblem (exit 3), a name that is no device a GptlabError (exit 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise GptlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EnvironmentProblem(f"--device {name}: this torch has no MPS (Apple GPU) support here; use --device cpu")
    return device
