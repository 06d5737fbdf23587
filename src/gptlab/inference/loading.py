"""A model ready to continue or score text, from one argument: what `sample`, `serve`, `eval`, `attention`
and the lm-eval model all start from, so that each reads a model, its tokenizer, its precision and its
quantization the same way."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import find_tokenizer, load_model, resolve_model_dir
from ..errors import GptlabError
from ..model import GPT
from ..precision import warn_if_emulated
from ..quantize import quantize_int8_where_faster
from ..tokenizers import TOKENIZER_FILE, Tokenizer

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8",)


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", *, dtype: str = "float32", quantize: str | None = None,
) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode, on `device`, in `dtype`, int8-quantized with `quantize="int8"` where int8
    decodes faster here: `quantize_int8_where_faster`) and its
    tokenizer, from a gptlab run, a Hugging Face GPT-2 directory or a named GPT-2 size.

    Both options are checked before the model is read; bfloat16 asked for where the device runs it slower
    than float32 (emulated) is said once on stderr, as training says it."""
    if dtype not in DTYPES:
        raise GptlabError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise GptlabError(f"quantize must be one of {', '.join(QUANTIZATIONS)} (or None), got {quantize!r}")
    directory = resolve_model_dir(path)
    model = load_model(directory, device)
    tokenizer = find_tokenizer(directory, model.config)
    if tokenizer is None:
        raise GptlabError(
            f"{directory}: no tokenizer ({TOKENIZER_FILE}, or GPT-2's vocab.json + merges.txt) beside "
            f"a model whose {model.config.vocab_size}-token vocabulary is not GPT-2's"
        )
    warn_if_emulated(dtype, device, way_out="--dtype float32 is the faster here")
    model = model.to(dtype=getattr(torch, dtype)).eval()
    if quantize == "int8":
        quantize_int8_where_faster(model)  # after the dtype: the scales are kept in it
    return model, tokenizer
