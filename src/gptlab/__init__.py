"""gptlab: a from-scratch GPT-2 you can train on your own text, sample from, evaluate and serve.

Names load with their module on first use (`gptlab.lazy`): importing gptlab costs nothing until then.
"""

from __future__ import annotations

import functools
import warnings

from .lazy import lazy_attributes

__version__ = "0.1.0"
_EXPORTS = {
    "GPT": ".model", "ModelOutput": ".model", "GPTConfig": ".config", "model_preset": ".config",
    "GptlabError": ".errors", "TrainConfig": ".train.config", "load_tokenizer": ".tokenizers",
    "load_model": ".checkpoint", "load_pretrained": ".checkpoint", "save_model": ".checkpoint",
    "Completion": ".inference", "SamplingParams": ".inference", "TextStream": ".inference",
    "complete": ".inference", "generate": ".inference",
}
__all__ = sorted(_EXPORTS)
_load, __dir__ = lazy_attributes(__name__, _EXPORTS)


def __getattr__(name: str) -> object:
    value = _load(name)
    if name == "GPT":
        _add_deprecated_methods(value)
    return value


def _deprecated(replacement: str, function):
    """`function` under an old name that says, once per call site, what replaces it."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        warnings.warn(f"deprecated: use {replacement} instead", DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    return wrapper


def _add_deprecated_methods(gpt: type) -> None:
    """GPT's loading, saving and sampling methods of earlier versions, on `gptlab.GPT`: model.py is the
    architecture alone now (it imports nothing above it), so they live at the package level."""
    from .checkpoint import load_model, save_model
    from .inference import generate

    gpt.from_pretrained = staticmethod(_deprecated("gptlab.load_model(path)", load_model))
    gpt.save_pretrained = _deprecated("gptlab.save_model(model, directory, require_hf=True)",
                                      lambda self, directory: save_model(self, directory, require_hf=True))
    gpt.generate = _deprecated("gptlab.generate(model, idx, max_new_tokens, ...)", generate)
