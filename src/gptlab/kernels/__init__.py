"""The fast paths behind the model's plain operations: linear layers, attention, GELU, int8 weights.

model.py says what GPT-2 computes; this package decides how, on the machine at hand. Each operation
has a few candidates that compute the same function (up to float rounding, tested against the plain
torch call), and `chooser.fastest` picks one by timing them on this machine, on the shape at hand, the
first time the shape comes up, as `torch.backends.cudnn.benchmark` does. Candidates are timed in
interleaved rounds and judged by their median round (a single lucky round on a busy machine chose a
product that then took 10 ms a call). No candidate is taken for
being fast somewhere else (a row-block product that doubles one CPU's decoding speed halved
another's), nor for running somewhere else: a candidate torch says this CPU cannot run (oneDNN's bf16
reorder without AVX-512) is not offered, and one that raises while built, warmed up or timed is left
out, recorded with its reason and logged once.

- `chooser`: the measurement, its guard, the per-machine cache, `force`, and GPTLAB_KERNELS.
- `products`: decoding's products of a few rows (F.linear, W @ x^T, row blocks, oneDNN prepacked, and
  for bf16 weights fbgemm's product on a float16 copy).
- `attention_paths`: torch's fused kernel (on torch's threads or on one) or the textbook formula.
- `gelu_forms`: torch's tanh GELU or the same function through sigmoid.
- `int8`: float rows times int8 weights (dequantized, torch's int8 weight-packed product, kept float or
  bf16 copies, or fbgemm's int8 x int8 product with the rows quantized on the fly);
  `gptlab.quantize` turns a model's layers into int8 ones.

Choices are kept for the process and, so that every process on the machine computes the same way (a
resumed run repeats the bits of an uninterrupted one), in a JSON file per machine under ~/.cache/gptlab
(`GPTLAB_KERNEL_CACHE` names another file; "off" keeps choices in memory only). The machine's
fingerprint includes what limits the instruction sets (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, and
FBGEMM_ENABLE_INSTRUCTIONS: fbgemm picks its kernels by the CPU itself, not by ATen's limit), so a
process held to fewer never reuses a fuller one's choices. Measuring never moves torch's random number
generators. `force(attention=..., linear=..., gelu=..., int8=...)` pins a choice, for tests and for
tools (such as FLOP counters) that must see the products.

GPTLAB_KERNELS=plain turns every fast path off: linear layers run F.linear, attention torch's fused
scaled_dot_product_attention, GELU torch's tanh GELU, int8 weights are dequantized for F.linear, and
nothing is measured. Use it to tell whether a problem lies in a fast path, or on a machine where the
measurement itself is unwelcome. Unset or "auto" measures; any other value is an error.
"""

from .chooser import CANDIDATES, cache_path, fastest, force, mode
from .products import (
    DECODE_ROWS, LINEAR_PRODUCTS, Linear, can_prepack, from_memory, largest_cache_bytes, linear, linear_path,
    matvec_rows, prepacked_product, prepacked_weight, release_scratch, tall_product,
)
from .attention_paths import (
    ATTENTION_PATHS, attention, attention_key, attention_path, fused_attention, textbook_attention,
    textbook_causal_attention,
)
from .gelu_forms import GELU_FORMS, gelu, gelu_form, sigmoid_form_gelu, tanh_gelu
from .int8 import dequantized_product, int8_linear, int8_products, packed_int8_product, packed_int8_product_in_bf16

__all__ = [
    "ATTENTION_PATHS", "CANDIDATES", "DECODE_ROWS", "GELU_FORMS", "LINEAR_PRODUCTS", "Linear", "attention",
    "attention_key", "attention_path", "cache_path", "can_prepack", "dequantized_product", "fastest", "force",
    "from_memory", "fused_attention", "gelu", "gelu_form", "int8_linear", "int8_products", "largest_cache_bytes",
    "linear", "linear_path", "matvec_rows", "mode", "packed_int8_product", "packed_int8_product_in_bf16",
    "prepacked_product", "prepacked_weight", "release_scratch", "sigmoid_form_gelu", "tall_product", "tanh_gelu",
    "textbook_attention", "textbook_causal_attention",
]
