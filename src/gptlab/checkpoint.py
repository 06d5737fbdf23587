"""Models on disk, in the Hugging Face GPT-2 format, in both directions.

A gptlab run directory *is* a Hugging Face checkpoint: `config.json` with `GPT2Config` field names and
`model.safetensors` with `GPT2LMHeadModel` key names. The only difference between the two layouts is
that GPT-2's `Conv1D` stores its weights (in, out) where `nn.Linear` stores (out, in), so those four
matrices per block are transposed on the way in and out.

Reading is deliberately as lenient as `transformers` (missing config fields take GPT2Config's
defaults; GPT2Model or GPT2LMHeadModel keys, with or without the `transformer.` prefix; safetensors,
sharded safetensors or `pytorch_model.bin`) and strict about everything that would change the
numbers: another architecture or option, a shape that disagrees with `config.json`, an untied head.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .errors import EnvironmentProblem, GptlabError, first_line
from .fileio import atomic_write_json, atomic_write_via, describe_os_error
from .heads import HEAD_MODULES, MultipleChoice, SequenceClassifier, head_kind, with_head
from .quantize import Int8Linear
from .lora import (ADAPTER_FILES, ADAPTER_WEIGHTS_FILE, LoRAConfig, apply_lora, is_adapter_dir, load_adapter_tensors,
                   lora_config_of, merge_lora, read_adapter, save_adapter)
from .model import GPT
from .tokenizers import (GPT2_VOCAB_SIZE, TOKENIZER_FILE, TOKENIZER_FILES, GPT2Tokenizer, Tokenizer,
                         load_tokenizer)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
# Parameters that GPT-2 implements as Conv1D, i.e. stored transposed relative to nn.Linear.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The top-level names of a GPT2Model, which GPT2LMHeadModel nests under "transformer.".
BASE_MODEL_PREFIXES = ("wte.", "wpe.", "h.", "ln_f.")
# Causal-mask buffers that transformers < 4.31 saved with the weights; they hold no parameters.
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
NAMED_CHECKPOINTS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# What transformers' GPT2Config assumes for a field its config.json leaves out.
GPT2_CONFIG_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.1,
    layer_norm_epsilon=1e-5, activation_function="gelu_new",
)
# GPT-2's GELU is the tanh approximation; these names all compute it (an exact-erf GELU differs by ~1e-4).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# A task head's Hugging Face class, named in config.json's architectures (gptlab.heads holds the models).
HEAD_ARCHITECTURES = {"GPT2ForSequenceClassification": "classify", "GPT2DoubleHeadsModel": "choice"}
# Beside a LoRA adapter with a task head: what config.json says of the head in a whole model's directory
# (its architecture, labels and pad id), which peft's two files have no place for.
TASK_HEAD_FILE = "task_head.json"


# --- config.json ------------------------------------------------------------------------------


def hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """GPTConfig -> the fields of transformers' GPT2Config."""
    # GPT-2's end-of-text id only means something when the vocabulary is GPT-2's (or a padded copy)
    eot = GPT2_VOCAB_SIZE - 1 if config.vocab_size >= GPT2_VOCAB_SIZE else None
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
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def unsupported_by_hf(config: GPTConfig) -> list[str]:
    """The options of `config` that Hugging Face's GPT-2 cannot represent."""
    return ["bias=False (Hugging Face GPT-2 always has biases)"] if not config.bias else []


def head_config(model: GPT) -> dict[str, Any]:
    """The config.json fields of a task model's head, as transformers' matching class reads them: the
    labels' names (id2label, label2id) and the pad id by which GPT2ForSequenceClassification finds the
    last token; GPT2DoubleHeadsModel's summary as GPT-2 configures it (a projection to 1 score at
    mc_token_ids, no activation). {} for a plain language model."""
    kind = head_kind(model)
    if kind == "classify":
        return {"architectures": ["GPT2ForSequenceClassification"],
                "id2label": {str(i): name for i, name in enumerate(model.labels)},
                "label2id": {name: i for i, name in enumerate(model.labels)},
                "pad_token_id": model.pad_token_id}
    if kind == "choice":
        return {"architectures": ["GPT2DoubleHeadsModel"], "summary_type": "cls_index", "summary_use_proj": True,
                "summary_proj_to_labels": True, "summary_activation": None,
                "summary_first_dropout": model.config.dropout}
    return {}


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """What a directory says of its task head: which (classify, choice), the labels, the pad id."""

    kind: str
    labels: tuple[str, ...] = ()
    pad_token_id: int | None = None

    def build(self, config: GPTConfig) -> GPT:
        if self.kind == "classify":
            return SequenceClassifier(config, self.labels, self.pad_token_id)
        return MultipleChoice(config)


def head_from_config(raw: dict[str, Any], source: Path) -> TaskHead | None:
    """The head a config.json (or task_head.json) describes, None for a language model; a head gptlab
    would compute differently from transformers is refused."""
    kind = next((HEAD_ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in HEAD_ARCHITECTURES), None)
    pad = raw.get("pad_token_id")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)):
        raise GptlabError(f"{source}: pad_token_id must be an integer, got {pad!r}")
    if kind == "classify":
        id2label = raw.get("id2label")
        if isinstance(id2label, dict) and id2label:
            try:
                ordered = sorted((int(i), str(name)) for i, name in id2label.items())
            except ValueError:
                raise GptlabError(f"{source}: id2label's keys must be class indices, got {sorted(id2label)[:3]}") from None
            if [i for i, _ in ordered] != list(range(len(ordered))):
                raise GptlabError(f"{source}: id2label must number the classes 0 .. n-1")
            labels = tuple(name for _, name in ordered)
        else:
            labels = tuple(f"LABEL_{i}" for i in range(int(raw.get("num_labels", 2))))
        if len(labels) < 2:
            raise GptlabError(f"{source}: a classifier of {len(labels)} label (regression): gptlab classifies into "
                              f"two or more labels")
        return TaskHead("classify", labels, pad)
    if kind == "choice":
        wanted = {"summary_type": "cls_index", "summary_use_proj": True, "summary_proj_to_labels": True,
                  "summary_activation": None}
        for name, value in wanted.items():
            if raw.get(name, value) != value:
                raise GptlabError(f"{source}: {name}={raw[name]!r}; gptlab's multiple-choice head is GPT-2's "
                                  f"({name}={value!r})")
        return TaskHead("choice", (), pad)
    return None


def config_from_hf(raw: dict[str, Any], source: Path) -> GPTConfig:
    """Read a GPT-2 `config.json`, refusing other architectures and options gptlab does not model."""
    model_type = raw.get("model_type")
    if model_type == "gptlab":  # a gptlab model that Hugging Face cannot represent
        fields = raw.get("gptlab")
        if not isinstance(fields, dict):
            raise GptlabError(f"{source}: model_type 'gptlab' but no 'gptlab' object with the model's fields")
        return _checked_config(source, **fields)
    if model_type != "gpt2":
        archs = raw.get("architectures") or [model_type]
        raise GptlabError(
            f"{source}: expected a GPT-2 config (model_type 'gpt2'), found {model_type!r} "
            f"({', '.join(map(str, archs))}); gptlab implements GPT-2 only"
        )
    raw = {**GPT2_CONFIG_DEFAULTS, **raw}
    if raw["activation_function"] not in TANH_GELUS:
        raise GptlabError(
            f"{source}: activation_function {raw['activation_function']!r} is not GPT-2's tanh GELU "
            f"(expected one of {', '.join(TANH_GELUS)})"
        )
    if raw.get("n_inner") not in (None, 4 * raw["n_embd"]):
        raise GptlabError(f"{source}: n_inner={raw['n_inner']} differs from GPT-2's 4 * n_embd")
    # reorder_and_upcast_attn only changes rounding under mixed precision, so it is accepted
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if raw.get(flag):
            raise GptlabError(f"{source}: {flag}=true is not part of GPT-2 and not supported by gptlab")
    if raw.get("scale_attn_weights", True) is False:
        raise GptlabError(f"{source}: scale_attn_weights=false is not part of GPT-2 and not supported by gptlab")
    return _checked_config(
        source,
        vocab_size=raw["vocab_size"],
        block_size=raw["n_positions"],
        n_layer=raw["n_layer"],
        n_head=raw["n_head"],
        n_embd=raw["n_embd"],
        dropout=raw["resid_pdrop"],
        bias=True,
        layer_norm_epsilon=raw["layer_norm_epsilon"],
    )


def _checked_config(source: Path, **fields: Any) -> GPTConfig:
    """GPTConfig(**fields), with any complaint about a field prefixed by the file it came from."""
    try:
        return GPTConfig(**fields)
    except GptlabError as exc:
        raise GptlabError(f"{source}: {exc}") from None
    except TypeError as exc:  # an unknown field name
        raise GptlabError(f"{source}: not a gptlab model config ({exc})") from None


def read_model_config(directory: Path) -> GPTConfig:
    return config_from_hf(read_config_json(directory), directory / CONFIG_FILE)


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise GptlabError(
            f"{directory}: no {CONFIG_FILE}; expected a gptlab run or a Hugging Face GPT-2 directory"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptlabError(f"{path}: not valid JSON ({first_line(exc)}); expected a GPT-2 config") from None
    if not isinstance(raw, dict):
        raise GptlabError(f"{path}: expected a JSON object with a GPT-2 config")
    return raw


# --- weights ----------------------------------------------------------------------------------


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
    """A GPT2LMHeadModel or GPT2Model state dict -> gptlab's names and layouts, lm_head dropped."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = f"transformer.{key}" if key.startswith(BASE_MODEL_PREFIXES) else key
        if name.endswith(MASK_BUFFER_SUFFIXES):
            continue
        if name.endswith(CONV1D_SUFFIXES) and tensor.dim() == 2:
            tensor = tensor.t()
        converted[name] = tensor
    lm_head = converted.pop("lm_head.weight", None)
    wte = converted.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise GptlabError(
            f"{source}: lm_head.weight differs from transformer.wte.weight; "
            f"expected GPT-2's tied output head (gptlab ties them)"
        )
    return converted


def load_weights_file(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of `model.safetensors`, its shards, or `pytorch_model.bin`, in that preference."""
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return _read_safetensors(single), single
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        return _read_sharded(index), index
    torch_path = directory / TORCH_WEIGHTS_FILE
    if torch_path.is_file():
        return _read_torch(torch_path), torch_path
    raise GptlabError(
        f"{directory}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE} or {TORCH_WEIGHTS_FILE}) with the model "
        f"weights next to its {CONFIG_FILE}"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptlabError(
            f"{path}: not a readable safetensors file (truncated or corrupt?); expected the model weights "
            f"({first_line(exc)})"
        ) from None


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise GptlabError(f"{index}: expected a safetensors index with a 'weight_map' ({exc!r})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = index.parent / shard
        if not path.is_file():
            raise GptlabError(f"{index}: names the shard {shard}, which is missing from {index.parent}")
        state.update(_read_safetensors(path))
    return state


def read_torch_file(path: Path, what: str) -> Any:
    """`torch.load(path)` of tensors and plain values only, its failures one plain line naming the file.

    torch's own message for a damaged file advises loading it with `weights_only=False`, which would run
    whatever code the file holds: advice a user must not be given for a file that is merely damaged.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle or zip
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            raise EnvironmentProblem(describe_os_error(exc, path)) from None
        raise GptlabError(f"{path}: not a readable {what}; it is damaged, truncated or not written by "
                          f"gptlab ({_torch_reason(exc)})") from None


def _torch_reason(exc: Exception) -> str:
    """The line of torch's message that says what was wrong, without its advice about weights_only."""
    advice = ("weights_only", "Weights only", "torch.load", "file an issue")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not any(phrase in line for phrase in advice)]
    return useful[0] if useful else type(exc).__name__


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    state = read_torch_file(path, "PyTorch state dict of the model weights")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise GptlabError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def _owned(tensor: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """`tensor` in memory of its own, not a view of the file that was `read`.

    safetensors maps the file and hands out views of the mapping, which stays (with every page read
    through it, the transposed Conv1D matrices' included) as long as one view lives: measured on GPT-2
    124M, 1.85x the weights' memory for as long as the model lived; with every tensor copied, the
    mapping goes once loading is done and the model holds 1x.
    """
    return tensor.clone() if tensor.data_ptr() == read.data_ptr() else tensor


def _assemble(config: GPTConfig, state: dict[str, torch.Tensor], weights_path: Path,
              build: Callable[[GPTConfig], GPT] = GPT) -> GPT:
    """A GPT of `config` (or `build(config)`: a task model) holding exactly `state`, after checking that
    every name and shape fits.

    The module is built on the meta device: random initialisation of weights that are overwritten
    anyway would cost 13 s for gpt2-medium on a 2-core CPU, and a second copy of the weights in memory.
    """
    with torch.device("meta"):
        model = build(config)
    expected = {name: t.shape for name, t in model.state_dict().items() if name != "lm_head.weight"}
    what = {"classify": "GPT-2 classifier", "choice": "GPT-2 multiple-choice model"}.get(head_kind(model), "GPT-2")
    where = f"{weights_path}: expected the weights of the {what} that {CONFIG_FILE} describes"
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise GptlabError(f"{where}, but {len(missing)} are missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        raise GptlabError(
            f"{where}, but it also holds {len(unexpected)} other tensor(s) (e.g. {', '.join(unexpected[:3])})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise GptlabError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, but {CONFIG_FILE} implies "
                f"{tuple(expected[name])}"
            )
    # gptlab keeps its parameters in float32 (autocast handles lower precision), whatever the file holds
    state = {name: _owned(t.to(torch.float32).contiguous(), t) for name, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie to the loaded embedding
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a parameter or buffer GPT gained that this loader does not know how to fill
        raise RuntimeError(f"load_model left {left} uninitialised")
    return model


# --- directories and names --------------------------------------------------------------------


def resolve_model_dir(path: str | Path) -> Path:
    """A local directory as is; a named GPT-2 size through huggingface_hub's cache when online.

    A local directory wins over a name, so `./gpt2` holding a downloaded copy is used as it is.
    """
    directory = Path(path)
    if directory.is_dir():
        return directory
    if str(path) in NAMED_CHECKPOINTS:
        return _download_named(str(path))
    if directory.is_file():
        raise GptlabError(f"{path}: is a file; pass the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    raise GptlabError(
        f"{path}: no such directory; expected a gptlab run, a Hugging Face GPT-2 directory or one of "
        f"{', '.join(NAMED_CHECKPOINTS)}"
    )


def _download_named(name: str) -> Path:
    alternative = (
        f"download it where the network allows (`hf download openai-community/{name} {CONFIG_FILE} {WEIGHTS_FILE} "
        f"vocab.json merges.txt --local-dir {name}`) and pass that local directory instead"
    )
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise GptlabError(
            f"loading {name!r} by name needs huggingface_hub (pip install huggingface_hub); or {alternative}"
        ) from None
    try:
        local = snapshot_download(
            repo_id=f"openai-community/{name}",
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "vocab.json", "merges.txt"],
        )
    except Exception as exc:  # offline, proxy, DNS, auth: all end the same way for the user
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{type(exc).__name__}, no network?"
        raise GptlabError(f"cannot download {name!r} from the Hugging Face Hub ({reason}); {alternative}") from None
    return Path(local)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", *, dropout: float | None = None, merge: bool = True
) -> GPT:
    """A GPT, in eval mode, from a gptlab run, a Hugging Face GPT-2 directory or a named GPT-2 size.

    A LoRA adapter's directory (a LoRA run, or what peft saved) gives its base with the adapter
    applied: merged into the weights (as fast as the base), or with `merge=False` kept apart.
    `dropout` replaces the checkpoint's rate (GPT-2's config says 0.1) for fine-tuning.
    A task model's directory (a classifier's, say) gives its body and LM head, without the task head:
    what fine-tuning it again, or sampling from it, starts from (`load_task_model` keeps the head).
    """
    return _load(resolve_model_dir(path), device, dropout=dropout, merge=merge, head=None)


def load_task_model(
    path: str | Path, device: str | torch.device = "cpu", *, dropout: float | None = None, merge: bool = True
) -> SequenceClassifier | MultipleChoice:
    """A task model (gptlab.heads), in eval mode, from a classify or choice run (or its LoRA adapter), or a
    Hugging Face GPT2ForSequenceClassification or GPT2DoubleHeadsModel directory; anything else is refused."""
    directory = resolve_model_dir(path)
    head = read_task_head(directory)
    if head is None:
        raise GptlabError(f"{path}: has no task head (a language model); train one with gptlab train --task "
                          f"classify (or choice) --init-from {path}")
    return _load(directory, device, dropout=dropout, merge=merge, head=head)


def read_task_head(directory: Path) -> TaskHead | None:
    """The task head a model directory (or a LoRA adapter's, through task_head.json) holds; None if none."""
    if is_adapter_dir(directory):
        path = directory / TASK_HEAD_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GptlabError(f"{path}: not a readable JSON file ({first_line(exc)})") from None
        if not isinstance(raw, dict):
            raise GptlabError(f"{path}: expected a JSON object describing the task head")
        return head_from_config(raw, path)
    return head_from_config(read_config_json(directory), directory / CONFIG_FILE)


def _load(directory: Path, device: str | torch.device, *, dropout: float | None, merge: bool,
          head: TaskHead | None) -> GPT:
    if is_adapter_dir(directory):
        lora, state = read_adapter(directory)
        if head is None:  # the body alone: the adapter's head tensors stay unread
            state = {n: t for n, t in state.items() if n.split(".")[0] not in HEAD_MODULES}
            lora = dataclasses.replace(lora, modules_to_save=())
        elif not lora.modules_to_save:
            raise GptlabError(f"{directory}: {TASK_HEAD_FILE} describes a task head, but the adapter holds none")
        base = adapter_base(directory, lora)
        model = _load(base, "cpu", dropout=dropout, merge=True, head=None)
        if head is not None:
            model = _with_fresh_head(model, head)  # the adapter holds the head's trained tensors
        apply_lora(model, lora)
        load_adapter_tensors(model, state, str(directory / ADAPTER_WEIGHTS_FILE))
        return (merge_lora(model) if merge else model).to(device).eval()
    raw = read_config_json(directory)
    config = config_from_hf(raw, directory / CONFIG_FILE)
    if dropout is not None:
        config = _checked_config(directory / CONFIG_FILE, **{**config.to_dict(), "dropout": dropout})
    state, weights_path = load_weights_file(directory)
    state = from_hf_state_dict(state, weights_path)
    if head is None:
        if head_from_config(raw, directory / CONFIG_FILE) is not None:  # a task model's body: its head left out
            state = {n: t for n, t in state.items() if n.split(".")[0] not in HEAD_MODULES}
        model = _assemble(config, state, weights_path)
    else:
        model = _assemble(config, state, weights_path, head.build)
    return model.to(device).eval()


def _with_fresh_head(body: GPT, head: TaskHead) -> GPT:
    if head.kind == "classify":
        return with_head(body, SequenceClassifier, labels=head.labels, pad_token_id=head.pad_token_id)
    return with_head(body, MultipleChoice)


def adapter_base(directory: Path, lora: LoRAConfig) -> Path:
    """The base model an adapter names (peft's base_model_name_or_path): a directory or a GPT-2 size."""
    name = lora.base.removeprefix("openai-community/")  # the Hub's name for the GPT-2 sizes
    if not name:
        raise GptlabError(f"{directory / 'adapter_config.json'}: names no base model (base_model_name_or_path); "
                          f"set it to the base's directory or GPT-2 size")
    try:
        base = resolve_model_dir(name)
    except GptlabError as exc:
        raise GptlabError(f"{directory}: the adapter's base model: {exc}") from None
    if base.resolve() == directory.resolve():
        raise GptlabError(f"{directory / 'adapter_config.json'}: names the adapter's own directory as its base")
    return base


def _has_tokenizer(directory: Path) -> bool:
    return (directory / TOKENIZER_FILE).is_file() or (directory / "vocab.json").is_file()


def find_tokenizer(directory: Path, config: GPTConfig) -> Tokenizer | None:
    """The tokenizer saved beside a model; GPT-2's BPE for a bare checkpoint of GPT-2's vocabulary size.
    An adapter without a tokenizer of its own has its base's."""
    if not _has_tokenizer(directory) and is_adapter_dir(directory):
        directory = adapter_base(directory, read_adapter(directory)[0])
    if _has_tokenizer(directory):
        tokenizer = load_tokenizer(directory)
    elif config.vocab_size == GPT2_VOCAB_SIZE:
        tokenizer = GPT2Tokenizer()
    else:
        return None
    # A model's vocabulary may be GPT-2's padded to a round size (nanoGPT's 50304), never a character
    # tokenizer's: its ids beyond the tokenizer's would fail mid-generation, so they fail here instead.
    padded = isinstance(tokenizer, GPT2Tokenizer) and tokenizer.vocab_size < config.vocab_size
    if tokenizer.vocab_size != config.vocab_size and not padded:
        raise GptlabError(
            f"{directory}: its tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{config.vocab_size}; they do not belong together (the tokenizer file was replaced or damaged?)"
        )
    return tokenizer


# --- writing ----------------------------------------------------------------------------------


def save_model(model: GPT, directory: str | Path, *, require_hf: bool = False) -> None:
    """Write `config.json` and `model.safetensors`.

    A config Hugging Face cannot represent is written as model_type "gptlab", which gptlab reads back
    and `transformers` refuses, rather than a GPT-2 config that would load the weights wrongly; with
    `require_hf` (an export) it is refused before anything is written. A model carrying a LoRA adapter
    writes the adapter alone, in peft's format: its base is already on disk.
    """
    if any(isinstance(module, Int8Linear) for module in model.modules()):
        raise GptlabError("cannot save an int8-quantized model (quantization is for inference); save the float "
                          "model it was made from")
    problems = unsupported_by_hf(model.config)
    if problems and require_hf:
        raise GptlabError(
            f"cannot export to the Hugging Face GPT-2 format: {'; '.join(problems)}; "
            f"gptlab's own format (a run directory, gptlab.save_model) still holds such a model"
        )
    if lora_config_of(model) is not None:  # a LoRA model: the adapter alone, as peft writes it
        save_adapter(model, directory)
        if head_kind(model) is not None:
            atomic_write_json(Path(directory) / TASK_HEAD_FILE, head_config(model))
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    if problems:
        config = {"architectures": ["GptlabGPT"], "model_type": "gptlab", "gptlab": model.config.to_dict()}
    else:
        config = hf_config(model.config, model.transformer.wte.weight.dtype)
    config.update(head_config(model))
    atomic_write_via(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, config)


# What `export_model` writes: all that a directory may hold for --overwrite to replace it.
EXPORT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, TASK_HEAD_FILE}) | TOKENIZER_FILES | ADAPTER_FILES


def export_model(source: str | Path, out: str | Path, *, overwrite: bool = False, merge: bool = False) -> list[str]:
    """Copy a model (and its tokenizer, when it has one) into a clean Hugging Face GPT-2 directory.

    Unlike a run directory, the result holds nothing but what `load_model` reads, ready to share.
    `overwrite` replaces an earlier export only: a directory holding anything else (a run, a dataset,
    a user's own files) is refused before anything is written. A LoRA adapter is exported as the
    adapter (peft's two files), or with `merge` as its base with the adapter merged in: a plain GPT-2.
    Returns the names of the files `out` then holds.
    """
    if not str(out).strip():
        raise GptlabError("the output directory is empty; name a directory to write the model into")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out}: exists and is not a directory")
    before = {p.name: p.stat().st_ino for p in out.iterdir() if not p.name.startswith(".")} if out.is_dir() else {}
    if before and not overwrite:
        raise GptlabError(f"{out} already holds files; pass --overwrite to replace an earlier export there")
    if before.keys() - EXPORT_FILES:
        others = ", ".join(sorted(before.keys() - EXPORT_FILES)[:4])
        raise GptlabError(f"{out} holds more than an exported model ({others}); --overwrite replaces an export "
                          f"only: choose another directory")
    directory = resolve_model_dir(source)
    if out.resolve() == directory.resolve():
        raise GptlabError(f"{out} is the model being exported; choose another directory")
    adapter = is_adapter_dir(directory)
    if merge and not adapter:
        raise GptlabError(f"{source}: holds no LoRA adapter (adapter_config.json) to merge; export it without --merge")
    load = load_task_model if read_task_head(directory) is not None else load_model
    model = load(directory, merge=merge or not adapter)
    tokenizer = find_tokenizer(directory, model.config)
    save_model(model, out, require_hf=True)
    if tokenizer is not None:
        tokenizer.save(out)
    for name, inode in before.items():  # an earlier export's file this one did not rewrite (a tokenizer's)
        if (out / name).stat().st_ino == inode:
            (out / name).unlink()
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
