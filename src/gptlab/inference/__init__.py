"""Inference: the engine that continues prompts (continuous batching over a slot KV cache, a batched
per-row sampler, streamed text), the library's ways into it, and loading a model for it (loading.py).

Names load with their module on first use: the command line reads `SamplingParams` for `sample`'s
options without importing torch.
"""

from __future__ import annotations

from ..lazy import lazy_attributes

_EXPORTS = {
    "Engine": ".engine", "Sequence": ".engine", "failure_cause": ".engine", "slide_window": ".engine",
    "Completion": ".offline", "TextStream": ".offline", "complete": ".offline", "completion_of": ".offline",
    "generate": ".offline", "MAX_LOGPROBS": ".params", "SamplingParams": ".params", "TokenLogprobs": ".sampler",
    "eval_mode": ".modes", "load_pretrained": ".loading",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
