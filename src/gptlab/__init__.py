"""gptlab: a from-scratch GPT-2 you can train on your own text, sample from, evaluate and serve."""

from .checkpoint import load_model, load_pretrained, save_model
from .config import GPTConfig, TrainConfig, model_preset
from .errors import GptlabError
from .generation import Completion, SamplingParams, TextStream, complete
from .model import GPT, ModelOutput
from .tokenizers import load_tokenizer

__all__ = [
    "GPT", "GPTConfig", "Completion", "GptlabError", "ModelOutput", "SamplingParams", "TextStream",
    "TrainConfig", "complete", "load_model", "load_pretrained", "load_tokenizer", "model_preset", "save_model",
]
__version__ = "0.1.0"
