"""gptlab: a from-scratch GPT-2 you can train on your own text, sample from, evaluate and serve.

Names load with their module on first use (`gptlab.lazy`): importing gptlab costs nothing until then.
"""

from __future__ import annotations

from .lazy import lazy_attributes

__version__ = "0.1.0"
_EXPORTS = {
    "GPT": ".model", "ModelOutput": ".model", "GPTConfig": ".config", "model_preset": ".config",
    "GptlabError": ".errors", "TrainConfig": ".train.config", "load_tokenizer": ".tokenizers",
    "load_model": ".checkpoint", "load_pretrained": ".inference.loading", "save_model": ".checkpoint",
    "Completion": ".inference", "SamplingParams": ".inference", "TextStream": ".inference",
    "complete": ".inference", "generate": ".inference",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
