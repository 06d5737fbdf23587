"""Models on disk, in the Hugging Face GPT-2 format, in both directions.

A gptlab run directory *is* a Hugging Face checkpoint: `config.json` with `GPT2Config` field names and
`model.safetensors` with `GPT2LMHeadModel` key names. The only difference between the two layouts is
that GPT-2's `Conv1D` stores its weights (in, out) where `nn.Linear` stores (out, in), so those four
matrices per block are transposed on the way in and out.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .errors import GptlabError
from .model import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
# Parameters that GPT-2 implements as Conv1D, i.e. stored transposed relative to nn.Linear.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NAMED_CHECKPOINTS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync, rename: a crash mid-write leaves the previous file, never half a new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def hf_config(config: GPTConfig) -> dict[str, Any]:
    """GPTConfig -> the fields of transformers' GPT2Config."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def unsupported_by_hf(config: GPTConfig) -> list[str]:
    """The options of `config` that Hugging Face's GPT-2 cannot represent."""
    return ["bias=False (Hugging Face GPT-2 always has biases)"] if not config.bias else []


def config_from_hf(raw: dict[str, Any], source: Path) -> GPTConfig:
    """Read a GPT-2 `config.json`, refusing other architectures and options gptlab does not model."""
    model_type = raw.get("model_type")
    if model_type == "gptlab":  # a gptlab model that Hugging Face cannot represent
        return GPTConfig(**raw["gptlab"])
    if model_type != "gpt2":
        archs = raw.get("architectures") or [model_type]
        raise GptlabError(
            f"{source}: expected a GPT-2 config (model_type 'gpt2'), found {model_type!r} ({', '.join(map(str, archs))})"
        )
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptlabError(f"{source}: activation_function {activation!r} is not GPT-2's tanh GELU")
    if raw.get("n_inner") not in (None, 4 * raw.get("n_embd", 768)):
        raise GptlabError(f"{source}: n_inner={raw['n_inner']} differs from GPT-2's 4 * n_embd")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(flag):
            raise GptlabError(f"{source}: {flag}=true is not supported by gptlab")
    if raw.get("scale_attn_weights", True) is False:
        raise GptlabError(f"{source}: scale_attn_weights=false is not supported by gptlab")
    try:
        return GPTConfig(
            vocab_size=raw["vocab_size"],
            block_size=raw.get("n_positions", raw.get("n_ctx")),
            n_layer=raw["n_layer"],
            n_head=raw["n_head"],
            n_embd=raw["n_embd"],
            dropout=float(raw.get("resid_pdrop", 0.0)),
            bias=True,
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as missing:
        raise GptlabError(f"{source}: missing field {missing} of a GPT-2 config") from None


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """gptlab parameters -> GPT2LMHeadModel key names and layouts (lm_head omitted: it is tied)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu")
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    return state


def from_hf_state_dict(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel or GPT2Model state dict -> gptlab's names and layouts."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers saved by old transformers versions
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        converted[name] = tensor
    lm_head = converted.pop("lm_head.weight", None)
    wte = converted.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise GptlabError(f"{source}: lm_head.weight differs from transformer.wte.weight; gptlab ties them")
    return converted


def load_weights_file(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of `model.safetensors`, or of `pytorch_model.bin` when that is all there is."""
    safetensors_path = directory / WEIGHTS_FILE
    if safetensors_path.is_file():
        try:
            return load_file(str(safetensors_path)), safetensors_path
        except (SafetensorError, OSError, ValueError) as exc:
            raise GptlabError(
                f"{safetensors_path}: not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from None
    torch_path = directory / TORCH_WEIGHTS_FILE
    if torch_path.is_file():
        try:
            return torch.load(torch_path, map_location="cpu", weights_only=True), torch_path
        except Exception as exc:  # torch raises many types for a damaged pickle/zip
            raise GptlabError(f"{torch_path}: not a readable PyTorch state dict: {exc}") from None
    raise GptlabError(f"{directory}: no {WEIGHTS_FILE} (or {TORCH_WEIGHTS_FILE}) with the model weights")


def read_model_config(directory: Path) -> GPTConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise GptlabError(f"{directory}: no {CONFIG_FILE}; expected a gptlab run or a Hugging Face GPT-2 directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptlabError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise GptlabError(f"{path}: expected a JSON object")
    return config_from_hf(raw, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT from a gptlab run or a Hugging Face GPT-2 directory (or a named GPT-2 via the hub)."""
    directory = resolve_model_dir(path)
    config = read_model_config(directory)
    state, weights_path = load_weights_file(directory)
    state = from_hf_state_dict(state, weights_path)
    model = GPT(config)
    own = model.state_dict()
    own.pop("lm_head.weight")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise GptlabError(f"{weights_path}: weights do not match {CONFIG_FILE} ({detail})")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise GptlabError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                f"but {CONFIG_FILE} implies {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=False)  # lm_head is tied to wte, loaded through it
    return model.to(device)


def resolve_model_dir(path: str | Path) -> Path:
    """A local directory as is; a named GPT-2 size through huggingface_hub's cache when online."""
    directory = Path(path)
    if directory.is_dir():
        return directory
    if str(path) in NAMED_CHECKPOINTS:
        return _download_named(str(path))
    raise GptlabError(f"{path}: no such directory (expected a gptlab run or a Hugging Face GPT-2 directory)")


def _download_named(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GptlabError(
            f"loading {name!r} by name needs huggingface_hub (pip install huggingface_hub); "
            f"or pass a local directory holding its config.json and model.safetensors"
        ) from None
    try:
        local = snapshot_download(repo_id=f"openai-community/{name}",
                                  allow_patterns=["config.json", "model.safetensors", "vocab.json", "merges.txt"])
    except Exception as exc:  # offline, proxy, auth: all end the same way for the user
        raise GptlabError(
            f"could not download {name!r} from the Hugging Face Hub ({type(exc).__name__}); "
            f"pass a local directory holding its config.json and model.safetensors instead"
        ) from None
    return Path(local)


def save_model(model: GPT, directory: str | Path, *, require_hf: bool = False) -> None:
    """Write `config.json` and `model.safetensors`; a config HF cannot represent is marked as gptlab's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    problems = unsupported_by_hf(model.config)
    if problems and require_hf:
        raise GptlabError(
            f"cannot export to the Hugging Face GPT-2 format: {'; '.join(problems)}"
        )
    if problems:
        # transformers will refuse an unknown model_type instead of loading the weights wrongly
        config = {"architectures": ["GptlabGPT"], "model_type": "gptlab", "gptlab": model.config.to_dict()}
    else:
        config = hf_config(model.config)
    weights_tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(to_hf_state_dict(model), str(weights_tmp), metadata={"format": "pt"})
    with open(weights_tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(weights_tmp, directory / WEIGHTS_FILE)
    atomic_write_json(directory / CONFIG_FILE, config)
