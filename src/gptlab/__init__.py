"""gptlab: a from-scratch GPT-2 you can train on your own text, sample from, evaluate and serve."""

from .checkpoint import load_model, save_model
from .config import GPTConfig, TrainConfig, model_preset
from .errors import GptlabError
from .model import GPT, ModelOutput
from .tokenizers import load_tokenizer

__all__ = [
    "GPT", "GPTConfig", "GptlabError", "ModelOutput", "TrainConfig", "load_model", "load_tokenizer",
    "model_preset", "save_model",
]
__version__ = "0.1.0"
