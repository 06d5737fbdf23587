"""Deprecated: generation moved to `gptlab.inference`, the engine behind `generate`, `complete`,
`TextStream`, `gptlab sample` and `gptlab serve`. Import these names from `gptlab.inference` (or from
`gptlab`); this alias goes in a later version."""

import warnings

from .inference import Completion, SamplingParams, TextStream, complete, generate, slide_window

warnings.warn("gptlab.generation is deprecated: import Completion, SamplingParams, TextStream, complete and "
              "generate from gptlab.inference (or gptlab)", DeprecationWarning, stacklevel=2)

__all__ = ["Completion", "SamplingParams", "TextStream", "complete", "generate", "slide_window"]
