"""GGUF export: the file read back with the `gguf` package holds the model's tensors (within the chosen
format's error), the metadata llama.cpp's GPT-2 architecture reads, and GPT-2's tokenizer; what cannot be
written is refused in one line before anything touches the disk. Where llama-cpp-python is installed,
llama.cpp itself loads the file, tokenizes as gptlab does, and its logits match gptlab's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_line_error, tiny_model
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.checkpoint import save_model
from gptlab.tokenizers import GPT2_VOCAB_SIZE, BPETokenizer, CharTokenizer, GPT2Tokenizer, gpt2_merges, gpt2_vocab

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")
F32, F16, Q8_0 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0)


def gpt2_vocab_model(vocab_size: int = GPT2_VOCAB_SIZE, n_embd: int = 32, **overrides) -> GPT:
    """GPT-2's vocabulary on a tiny body (n_embd 32: one Q8_0 block per row)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=n_embd, **overrides)
    return GPT(config).eval()


def save_run(model: GPT, directory: Path, tokenizer=None) -> Path:
    save_model(model, directory)
    (tokenizer or GPT2Tokenizer()).save(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path]:
    model = gpt2_vocab_model()
    return model, save_run(model, tmp_path_factory.mktemp("gguf") / "run")


@pytest.fixture(scope="module")
def exported(gpt2_run, tmp_path_factory: pytest.TempPathFactory):
    """quantize -> (tensors, metadata) of the exported file, read once each: GGUFReader takes seconds to
    parse 100k vocabulary strings."""
    from gptlab.cli import main

    _, run = gpt2_run
    files = {}
    for quantize in ("f32", "f16", "q8_0"):
        out = tmp_path_factory.mktemp("gguf") / f"model-{quantize}.gguf"
        assert main(["export", str(run), str(out), "--format", "gguf", "--quantize", quantize]) == 0
        files[quantize] = (*read_back(out), out)
    return files


def expected_names(model: GPT) -> dict[str, str]:
    """llama.cpp's GPT-2 tensor names (gguf-py's TENSOR_NAMES for MODEL_ARCH.GPT2) -> gptlab's parameter names."""
    names = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias"}
    parts = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
             "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
    for i in range(model.config.n_layer):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"blk.{i}.{ours}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
    return names


def read_back(path: Path) -> tuple[dict[str, tuple[object, np.ndarray]], dict[str, object]]:
    """({name: (GGML type, values as float32 in numpy's (rows, columns) order)}, {metadata key: value})."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
               for t in reader.tensors}
    return tensors, {name: field.contents() for name, field in reader.fields.items()}


def assert_within_q8_0(original: np.ndarray, restored: np.ndarray) -> None:
    """Q8_0 rounds each value to the nearest multiple of d = max|block| / 127 (d itself stored as float16), so
    each value is off by at most d/2 plus 127 times d's own float16 rounding (2^-11 relative)."""
    blocks = original.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    bound = d / 2 + 127 * d * 2.0 ** -11 + 1e-12
    error = np.abs(blocks - restored.reshape(-1, 32))
    assert (error <= bound).all(), float((error / bound).max())
    assert error.max() > 0  # the values were really quantized, not stored exactly


@pytest.mark.parametrize("quantize", ["f32", "f16", "q8_0"])
def test_every_tensor_read_back_within_the_formats_error(gpt2_run, exported, quantize: str) -> None:
    model, _ = gpt2_run
    tensors, _, _ = exported[quantize]
    names = expected_names(model)
    assert set(tensors) == set(names)  # and no output.weight: llama.cpp ties it to token_embd, as gptlab does
    state = model.state_dict()
    matrix_type = {"f32": F32, "f16": F16, "q8_0": Q8_0}[quantize]
    for name, (ggml_type, values) in tensors.items():
        original = state[names[name]].numpy()
        assert values.shape == original.shape, name  # (out, in): nn.Linear's layout is llama.cpp's
        if original.ndim == 1 or name == "position_embd.weight":
            assert ggml_type == F32, name
            np.testing.assert_array_equal(values, original, err_msg=name)
        elif quantize == "f32":
            assert ggml_type == F32, name
            np.testing.assert_array_equal(values, original, err_msg=name)
        elif quantize == "f16":
            assert ggml_type == matrix_type, name
            np.testing.assert_array_equal(values, original.astype(np.float16).astype(np.float32), err_msg=name)
            np.testing.assert_allclose(values, original, rtol=2.0 ** -11, atol=2.0 ** -24, err_msg=name)
        else:
            assert ggml_type == matrix_type, name
            assert_within_q8_0(original, values)


def test_metadata_is_what_llama_cpps_gpt2_reads(gpt2_run, exported) -> None:
    model, _ = gpt2_run
    _, fields, _ = exported["q8_0"]
    c = model.config
    expected = {
        "general.architecture": "gpt2", "gpt2.context_length": c.block_size, "gpt2.embedding_length": c.n_embd,
        "gpt2.block_count": c.n_layer, "gpt2.feed_forward_length": 4 * c.n_embd,
        "gpt2.attention.head_count": c.n_head, "general.file_type": gguf.LlamaFileType.MOSTLY_Q8_0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 50256, "tokenizer.ggml.eos_token_id": 50256,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(c.layer_norm_epsilon, rel=1e-6)
    vocab = gpt2_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.__getitem__)
    types = fields["tokenizer.ggml.token_type"]
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges == gpt2_merges() and merges[0] == "Ġ t"


def test_a_nanogpt_style_model_padded_vocabulary_no_biases(gptlab, tmp_path: Path) -> None:
    """nanoGPT's vocabulary of 50304: the rows past GPT-2's 50257 are exported (the model has them) as unused
    tokens. Without biases: llama.cpp's GPT-2 requires every bias, and zeros compute exactly what none does."""
    model = gpt2_vocab_model(vocab_size=50304, bias=False)
    run = save_run(model, tmp_path / "run")
    out = tmp_path / "model.gguf"
    code, stdout, err = gptlab("export", str(run), str(out), "--format", "gguf")
    assert code == 0, err
    assert str(out) in stdout and "f32" in stdout
    tensors, fields = read_back(out)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 50304 and tokens[50256] == "<|endoftext|>" and tokens[50257] == "[PAD50257]"
    assert set(types[50257:]) == {gguf.TokenType.UNUSED}
    assert set(tensors) == set(expected_names(model))
    assert tensors["token_embd.weight"][1].shape == (50304, 32)
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.bias"][1], np.zeros(3 * model.config.n_embd))
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"][1],
                                  model.transformer.h[0].attn.c_attn.weight.detach().numpy())


def trained_bpe() -> BPETokenizer:
    """A byte-level BPE of gptlab's own on GPT-2's pattern (a few merges, as `gptlab tokenizer train` learns them)."""
    return BPETokenizer([("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("o", "u"), ("Ġ", "a")])


def test_a_trained_bpe_travels_in_the_file(gptlab, tmp_path: Path) -> None:
    tokenizer = trained_bpe()
    run = save_run(gpt2_vocab_model(vocab_size=tokenizer.vocab_size), tmp_path / "run", tokenizer)
    out = tmp_path / "model.gguf"
    code, _, err = gptlab("export", str(run), str(out), "--format", "gguf", "--quantize", "f16")
    assert code == 0, err
    _, fields = read_back(out)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == tokenizer.vocab_size == 256 + 5 + 1
    assert [tokens[i] for i in tokenizer.encode(" the")] == ["Ġthe"]  # a merged token's id is its place in the file
    assert tokens[tokenizer.eos_id] == "<|endoftext|>" and fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he", "o u", "Ġ a"]
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    try:
        import llama_cpp
    except ImportError:
        return  # llama.cpp's own reading of it is checked where llama-cpp-python is installed
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, n_threads=2, verbose=False)
    text = "the youth at the gate, thou"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    llm.close()


# --- refusals: one line, exit 2, nothing written ------------------------------------------------


def test_a_chat_runs_template_travels_in_the_file(gptlab, tmp_path: Path) -> None:
    from gptlab.chat import CHAT_TEMPLATE

    for template in (CHAT_TEMPLATE, None):  # and a run without one writes none
        tokenizer = trained_bpe()
        tokenizer.chat_template = template
        run = save_run(gpt2_vocab_model(vocab_size=tokenizer.vocab_size), tmp_path / f"run-{bool(template)}", tokenizer)
        out = tmp_path / f"model-{bool(template)}.gguf"
        code, _, err = gptlab("export", str(run), str(out), "--format", "gguf", "--quantize", "f16")
        assert code == 0, err
        assert read_back(out)[1].get("tokenizer.chat_template") == template


def test_a_character_vocabulary_is_refused(gptlab, tmp_path: Path) -> None:
    run = save_run(tiny_model(vocab_size=3), tmp_path / "run", CharTokenizer(["a", "b", "c"]))
    out = tmp_path / "model.gguf"
    code, _, err = gptlab("export", str(run), str(out), "--format", "gguf")
    one_line_error(code, err, 2, "llama.cpp", "char", "end-of-text")
    assert list(tmp_path.iterdir()) == [run]


def test_a_bpe_on_the_gpt4_pattern_is_refused(gptlab, tmp_path: Path) -> None:
    tokenizer = BPETokenizer([("Ġ", "t")], pattern="gpt4")
    run = save_run(gpt2_vocab_model(vocab_size=tokenizer.vocab_size), tmp_path / "run", tokenizer)
    code, _, err = gptlab("export", str(run), str(tmp_path / "model.gguf"), "--format", "gguf")
    one_line_error(code, err, 2, "'gpt4' pattern", "llama.cpp pre-tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_existing_file_is_kept_without_overwrite(gptlab, gpt2_run, tmp_path: Path) -> None:
    _, run = gpt2_run
    out = tmp_path / "model.gguf"
    out.write_bytes(b"mine")
    code, _, err = gptlab("export", str(run), str(out), "--format", "gguf")
    one_line_error(code, err, 2, str(out), "--overwrite")
    assert out.read_bytes() == b"mine"
    assert gptlab("export", str(run), str(out), "--format", "gguf", "--overwrite")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left


def test_q8_0_needs_rows_in_blocks_of_32(gptlab, tmp_path: Path) -> None:
    run = save_run(gpt2_vocab_model(n_embd=48), tmp_path / "run")
    out = tmp_path / "model.gguf"
    code, _, err = gptlab("export", str(run), str(out), "--format", "gguf", "--quantize", "q8_0")
    one_line_error(code, err, 2, "q8_0", "n_embd=48", "32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_quantize_belongs_to_gguf(gptlab, gpt2_run, tmp_path: Path) -> None:
    """A Hugging Face export keeps the weights as they are; --quantize there is a mistake, said so."""
    _, run = gpt2_run
    code, _, err = gptlab("export", str(run), str(tmp_path / "out"), "--quantize", "f16")
    one_line_error(code, err, 2, "--quantize", "--format gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_is_not_a_gguf_file(gptlab, gpt2_run, tmp_path: Path) -> None:
    _, run = gpt2_run
    code, _, err = gptlab("export", str(run), str(tmp_path), "--format", "gguf")
    one_line_error(code, err, 2, "is a directory", "one file")
    assert list(tmp_path.iterdir()) == []


# --- llama.cpp itself (optional: llama-cpp-python compiles llama.cpp, several minutes) ----------

# How far llama.cpp's logits may be from gptlab's float32 ones, as fractions of their spread (standard
# deviation): (largest difference, root mean square difference). Even an f32 file is computed with a float16
# KV cache (llama.cpp's default) and a float16 GELU table: about 2^-11 relative per value (measured here: 7e-4,
# 9e-5). f16 adds the weights' own 2^-11 rounding (2.2e-3, 3.5e-4). For q8_0 llama.cpp rounds the activations
# to Q8_0 too before each product (a Q8_0 x Q8_0 dot product), 1/254 of a block's largest value on both sides
# (5.2e-2, 9.3e-3).
LOGIT_TOLERANCE = {"f32": (5e-3, 1e-3), "f16": (5e-3, 1e-3), "q8_0": (1e-1, 2e-2)}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                   "llama-cpp-python: it compiles llama.cpp, several minutes)")


def test_llama_cpp_tokenizes_as_gptlab_does(llama_cpp, exported) -> None:
    llm = llama_cpp.Llama(model_path=str(exported["f32"][2]), n_ctx=32, n_threads=2, verbose=False)
    tok = GPT2Tokenizer()
    for text in ["ROMEO: But, soft! what light through yonder window breaks?", "  two  spaces\n\nand 1234 numbers",
                 "naïve café – “quotes” 😀 我想", "I've, you'll, he'd; it's <|endoftext|>"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text)).decode() == text
    llm.close()


@pytest.mark.parametrize("quantize", ["f32", "f16", "q8_0"])
def test_llama_cpp_computes_gptlabs_logits(llama_cpp, gpt2_run, exported, quantize: str) -> None:
    """Teacher-forced over a prompt and gptlab's 16 greedy tokens: every position's logits within the format's
    precision, and llama.cpp's most likely token gptlab's wherever gptlab's lead over the runner-up exceeds
    twice that precision (nearer ties may go either way, for a reason the format explains)."""
    model, _ = gpt2_run
    prompt = GPT2Tokenizer().encode("ROMEO: But, soft! what light")
    with torch.no_grad():
        from gptlab import generate

        ids = generate(model, torch.tensor([prompt]), 16, temperature=0)[0].tolist()
        ours = model(torch.tensor([ids])).logits[0].numpy()  # (T, vocab)
    llm = llama_cpp.Llama(model_path=str(exported[quantize][2]), n_ctx=32, n_threads=2, logits_all=True,
                          verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    llm.close()
    largest, rms = LOGIT_TOLERANCE[quantize]
    difference = np.abs(theirs - ours) / ours.std()
    assert difference.max() <= largest and np.sqrt((difference ** 2).mean()) <= rms, difference.max()
    tolerance = largest * ours.std()
    top2 = np.sort(ours, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert clear.sum() >= len(ids) // 2, "too many near-ties to test greedy agreement"
    assert (theirs.argmax(1) == ours.argmax(1))[clear].all()
