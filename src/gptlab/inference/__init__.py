"""Inference: the engine that continues prompts (continuous batching over a slot KV cache, a batched
per-row sampler, streamed text), and the library's ways into it."""

from .engine import Engine, Sequence, failure_cause, slide_window
from .offline import Completion, TextStream, complete, completion_of, generate
from .params import MAX_LOGPROBS, SamplingParams
from .sampler import TokenLogprobs

__all__ = [
    "MAX_LOGPROBS", "Completion", "Engine", "SamplingParams", "Sequence", "TextStream", "TokenLogprobs",
    "complete", "completion_of", "failure_cause", "generate", "slide_window",
]
