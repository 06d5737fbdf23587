"""A model as one GGUF file: what llama.cpp, Ollama and LM Studio load.

The file follows llama.cpp's own GPT-2 converter (`convert_hf_to_gguf.py`, class GPT2Model) so that
llama.cpp's `gpt2` architecture reads it unchanged: the same metadata keys, the same tensor names and
the same choice of which tensors keep float32 (LayerNorms, biases and the position embedding; only the
matrices are stored at 16 or 8 bits). gptlab's `nn.Linear` weights are already (out, in), the layout
llama.cpp expects, so nothing is transposed (the HF converter transposes GPT-2's Conv1D instead). The
output head is left out: llama.cpp ties it to `token_embd` when `output.weight` is absent, as GPT-2 does.

The tokenizer travels inside the file. GPT-2's BPE, or a byte-level BPE trained with gptlab on GPT-2's
pattern, is written as llama.cpp's `gpt2` tokenizer model with its pre-tokenizer `gpt-2`. A character vocabulary is refused: llama.cpp's BPE vocabulary always
has an end-of-text token (id 11 unless the file names another inside the vocabulary), and a character
vocabulary has none, so llama.cpp would stop generating at the twelfth character of the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .bpe import bytes_to_unicode
from .checkpoint import find_tokenizer, load_model, resolve_model_dir
from .errors import EnvironmentProblem, GptlabError
from .fileio import atomic_write_via
from .model import GPT
from .tokenizers import GPT2_EOT, BPETokenizer, GPT2Tokenizer, Tokenizer, gpt2_merges, gpt2_vocab

# --quantize -> (the GGML type of every matrix, the file type llama.cpp reports)
QUANTIZATIONS = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32  # Q8_0 stores each run of 32 values as one float16 scale and 32 int8s


def _gguf():  # type: ignore[no-untyped-def]
    """The `gguf` package, imported only by an export (the rest of gptlab never needs it)."""
    try:
        import gguf
    except ImportError:
        raise EnvironmentProblem("GGUF export needs the gguf package (pip install 'gptlab[export]' or "
                                 "pip install gguf)") from None
    return gguf


def gguf_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor) for every tensor the `gpt2` architecture reads, in its layout.

    A model trained without biases gets zero biases: llama.cpp's GPT-2 requires them, and a zero bias
    computes exactly what no bias does.
    """
    t = model.transformer
    yield "token_embd.weight", t.wte.weight
    yield "position_embd.weight", t.wpe.weight
    for i, block in enumerate(t.h):
        parts = {
            "attn_norm": block.ln_1, "attn_qkv": block.attn.c_attn, "attn_output": block.attn.c_proj,
            "ffn_norm": block.ln_2, "ffn_up": block.mlp.c_fc, "ffn_down": block.mlp.c_proj,
        }
        for name, module in parts.items():
            yield f"blk.{i}.{name}.weight", module.weight
            yield f"blk.{i}.{name}.bias", _bias(module)
    yield "output_norm.weight", t.ln_f.weight
    yield "output_norm.bias", _bias(t.ln_f)


def _bias(module: torch.nn.Module) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return bias if bias is not None else torch.zeros(module.weight.shape[0])


def stored_type(name: str, tensor: torch.Tensor, quantize: str):  # type: ignore[no-untyped-def]
    """The GGML type a tensor is stored in: float32 for vectors and the position embedding (as llama.cpp's
    converter keeps them), the requested type for every other matrix."""
    q = _gguf().GGMLQuantizationType
    if tensor.dim() < 2 or name == "position_embd.weight" or quantize == "f32":
        return q.F32
    return q.F16 if quantize == "f16" else q.Q8_0


def check_exportable(model: GPT, tokenizer: Tokenizer | None, quantize: str) -> None:
    """Refuse, before anything is written, what the file or llama.cpp could not represent."""
    if quantize not in QUANTIZATIONS:
        raise GptlabError(f"--quantize {quantize!r}: GGUF export writes one of {', '.join(QUANTIZATIONS)}")
    if tokenizer is None:
        raise GptlabError("the model has no tokenizer beside it, and a GGUF file must carry one")
    if isinstance(tokenizer, BPETokenizer) and tokenizer.pattern != "gpt2":
        raise GptlabError(f"this BPE splits text with the {tokenizer.pattern!r} pattern, which GGUF export does not "
                          f"map to a llama.cpp pre-tokenizer yet; a BPE trained with the gpt2 pattern exports")
    if not isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer)):
        raise GptlabError(
            f"llama.cpp cannot represent the {tokenizer.name!r} tokenizer: its BPE vocabulary always has an "
            f"end-of-text token and a {tokenizer.name} vocabulary has none, so llama.cpp would stop at token 11; "
            f"only a byte-level BPE (GPT-2's or one trained with gptlab) can be exported to GGUF"
        )
    if quantize == "q8_0" and model.config.n_embd % Q8_0_BLOCK:
        raise GptlabError(f"q8_0 stores rows in blocks of {Q8_0_BLOCK} values, and n_embd={model.config.n_embd} "
                          f"is not a multiple of {Q8_0_BLOCK}; export f16 or f32 instead")
    if quantize == "f16":
        too_large = [name for name, t in gguf_tensors(model)
                     if t.dim() == 2 and name != "position_embd.weight" and t.abs().max() > 65504]
        if too_large:
            raise GptlabError(f"{too_large[0]} holds values beyond float16's range (65504); export f32 or q8_0")


def _vocabulary(tokenizer: GPT2Tokenizer | BPETokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """The tokens in id order (as the byte-level strings of vocab.json), their llama.cpp types (special tokens
    CONTROL) and the merges ('left right'); a vocabulary padded to a round size (nanoGPT's 50304) gets unused
    placeholder tokens, as llama.cpp's converter writes them."""
    token_type = _gguf().TokenType
    if isinstance(tokenizer, BPETokenizer):
        # its ids: the 256 bytes in GPT-2's order, one token per merge in merge order, the special tokens
        order = [*bytes_to_unicode().values(), *(a + b for a, b in tokenizer.merges), *tokenizer.special_tokens]
        vocab, specials = {token: i for i, token in enumerate(order)}, set(tokenizer.special_tokens)
        merges = [f"{a} {b}" for a, b in tokenizer.merges]
    else:
        vocab, specials, merges = gpt2_vocab(), {GPT2_EOT}, gpt2_merges()
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(token_type.CONTROL if by_id[i] in specials else token_type.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(token_type.UNUSED)
    return tokens, types, merges


def write_gguf(model: GPT, tokenizer: Tokenizer | None, out: Path, quantize: str, name: str) -> None:
    """Write `model` and its tokenizer to `out` as one GGUF file, atomically."""
    gguf = _gguf()
    check_exportable(model, tokenizer, quantize)
    assert isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer))
    config = model.config
    tensors = []
    for tensor_name, tensor in gguf_tensors(model):
        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        qtype = stored_type(tensor_name, tensor, quantize)
        if qtype == gguf.GGMLQuantizationType.F32:
            tensors.append((tensor_name, data, None))
        elif qtype == gguf.GGMLQuantizationType.F16:
            tensors.append((tensor_name, data.astype(np.float16), None))
        else:
            tensors.append((tensor_name, gguf.quants.quantize(data, qtype), qtype))
    tokens, types, merges = _vocabulary(tokenizer, config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize]

    def produce(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        writer.add_name(name)
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eos_id)
        writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_add_bos_token(False)  # gptlab, like GPT-2, feeds a prompt as it is
        if tokenizer.chat_template:  # a run tuned with --task chat: llama.cpp reads its template here
            writer.add_chat_template(tokenizer.chat_template)
        for tensor_name, data, raw_dtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_via(out, produce)


def export_gguf(source: str | Path, out: str | Path, *, quantize: str = "f32", overwrite: bool = False) -> Path:
    """Write the model at `source` (a run, a Hugging Face GPT-2 directory or a GPT-2 size) to the GGUF
    file `out`. Every refusal comes before the disk is touched; an existing file is replaced only with
    `overwrite`. Returns the path written."""
    if not str(out).strip():
        raise GptlabError("the output file name is empty; name the .gguf file to write")
    out = Path(out)
    if out.is_dir():
        raise GptlabError(f"{out}: is a directory; a GGUF export is one file (e.g. {out / 'model.gguf'})")
    if out.exists() and not overwrite:
        raise GptlabError(f"{out} already exists; pass --overwrite to replace it")
    if quantize not in QUANTIZATIONS:
        raise GptlabError(f"--quantize {quantize!r}: GGUF export writes one of {', '.join(QUANTIZATIONS)}")
    directory = resolve_model_dir(source)
    model = load_model(directory)
    tokenizer = find_tokenizer(directory, model.config)
    write_gguf(model, tokenizer, out, quantize, name=directory.resolve().name)
    return out
