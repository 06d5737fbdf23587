"""gptlab: a from-scratch GPT-2 you can train on your own text, sample from, evaluate and serve."""

import functools
import warnings

from .checkpoint import load_model, load_pretrained, save_model
from .config import GPTConfig, model_preset
from .errors import GptlabError
from .inference import Completion, SamplingParams, TextStream, complete, generate
from .model import GPT, ModelOutput
from .tokenizers import load_tokenizer
from .train.config import TrainConfig

__all__ = [
    "GPT", "GPTConfig", "Completion", "GptlabError", "ModelOutput", "SamplingParams", "TextStream",
    "TrainConfig", "complete", "generate", "load_model", "load_pretrained", "load_tokenizer", "model_preset",
    "save_model",
]
__version__ = "0.1.0"


def _deprecated(replacement: str, function):
    """`function` under an old name that says, once per call site, what replaces it."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        warnings.warn(f"deprecated: use {replacement} instead", DeprecationWarning, stacklevel=2)
        return function(*args, **kwargs)

    return wrapper


# GPT's loading, saving and sampling methods of earlier versions: model.py is the architecture alone now
# (it imports nothing above it), so they live at the package level and these names point there.
GPT.from_pretrained = staticmethod(_deprecated("gptlab.load_model(path)", load_model))
GPT.save_pretrained = _deprecated("gptlab.save_model(model, directory, require_hf=True)",
                                  lambda self, directory: save_model(self, directory, require_hf=True))
GPT.generate = _deprecated("gptlab.generate(model, idx, max_new_tokens, ...)", generate)
