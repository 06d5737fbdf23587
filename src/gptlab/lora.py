"""LoRA (Hu et al. 2021): fine-tune a frozen GPT through low-rank updates of its matrices, in PEFT's format.

A targeted layer computes `x W^T + b + (alpha / r) * dropout(x) A^T B^T`, with A (r, in) and B (out, r):
only A and B train, so the optimizer keeps state for a few hundredths of a percent of the weights, and
the frozen W needs neither a gradient nor moments. B starts at zero, so training starts from the
pretrained model exactly. The update never forms the (out, in) product B A while training (that would
cost a full-size weight gradient again); merging adds it to W once, for inference and export.

On disk an adapter is what Hugging Face's `peft` writes for GPT-2: `adapter_config.json` and
`adapter_model.safetensors`, keys `base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight`.
GPT-2's layers are `Conv1D`s there, which only changes how peft merges (`fan_in_fan_out: true`); A and B
have nn.Linear's layout in both, so they are written and read as they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import EnvironmentProblem, GptlabError, first_line
from .fileio import atomic_write_json, atomic_write_via, describe_os_error
from .heads import HEAD_MODULES
from .kernels import Linear, linear
from .model import GPT

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = frozenset({ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE})
# The matrices of a block LoRA may adapt, by their names inside `transformer.h.{i}` (GPT-2's Conv1Ds).
LORA_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
DEFAULT_TARGETS = "c_attn,c_proj,c_fc"
PEFT_PREFIX = "base_model.model."
# adapter_config.json fields that ask for more than plain LoRA on whole layers; gptlab refuses an adapter
# that sets any of them rather than loading it into different numbers.
UNSUPPORTED_FIELDS = ("use_dora", "lora_bias", "layers_to_transform", "rank_pattern",
                      "alpha_pattern", "trainable_token_indices", "target_parameters", "layer_replication",
                      "alora_invocation_tokens", "use_qalora", "use_bdlora", "exclude_modules")


@dataclass(frozen=True)
class LoRAConfig:
    """One adapter: its rank, alpha, dropout, the layers it adapts and the base it belongs to."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(DEFAULT_TARGETS.split(","))
    base: str = ""  # the base model, as peft's base_model_name_or_path: a local directory or a GPT-2 size
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023), as peft's use_rslora
    # a task head (gptlab.heads) trained whole beside the adapters and saved with them: peft's modules_to_save
    modules_to_save: tuple[str, ...] = ()
    task_type: str | None = "CAUSAL_LM"  # peft's: which PeftModel class wraps the base (SEQ_CLS: a classifier)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def peft_config(self) -> dict[str, Any]:
        """adapter_config.json: the fields peft reads for a LoRA on GPT-2 (the rest take its defaults)."""
        return {
            "peft_type": "LORA", "task_type": self.task_type, "base_model_name_or_path": self.base or None,
            "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": list(self.targets), "fan_in_fan_out": True, "bias": "none",
            "use_rslora": self.rslora, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": list(self.modules_to_save) or None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {},
        }


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated (or listed) target names, each checked to name at least one of LORA_LAYERS."""
    names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    if not names:
        raise GptlabError(f"--lora-targets names no layer; choose among {', '.join(_target_names())}")
    for name in names:
        if not target_layers((name,)):
            raise GptlabError(f"--lora-targets: {name!r} names no layer of GPT-2; choose among "
                              f"{', '.join(_target_names())}")
    return names


def target_layers(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The LORA_LAYERS that `targets` name, by peft's rule: a target is a layer's name or its dotted end."""
    return tuple(layer for layer in LORA_LAYERS if any(layer == t or layer.endswith("." + t) for t in targets))


def _target_names() -> list[str]:
    return sorted({*LORA_LAYERS, *(layer.split(".")[1] for layer in LORA_LAYERS)})


class LoRALinear(Linear):
    """A frozen Linear (the same `weight` and `bias`, so its names do not change) plus B A, scaled."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        where = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **where)  # (r, in), peft's initialisation:
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **where)  # kaiming-uniform A, zero B
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_A(self.lora_dropout(x)) * self.scaling  # (B, T, r): the scale on r channels, not out
        return linear(x, self.weight, self.bias) + self.lora_B(update)  # (B, T, out)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A: the one matrix that computes what this layer does without dropout."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling  # (out, in)
        return (self.weight.float() + delta).to(self.weight.dtype)


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The adapter a model carries (set by `apply_lora`), or None for a plain model."""
    return getattr(model, "lora", None)


def apply_lora(model: GPT, config: LoRAConfig) -> GPT:
    """Freeze every weight of `model` and give each targeted layer a trainable A and B; returns `model`."""
    if lora_config_of(model) is not None:
        raise GptlabError("the model already carries a LoRA adapter; merge it first (gptlab export --merge)")
    if config.rank < 1:
        raise GptlabError(f"--lora-rank must be at least 1, got {config.rank}")
    layers = target_layers(config.targets)
    if not layers:
        raise GptlabError(f"LoRA targets {', '.join(config.targets)} name no layer of GPT-2")
    for name in config.modules_to_save:
        if not hasattr(model, name):
            raise GptlabError(f"the adapter trains a {name!r} head, which this model has not: load it as the "
                              f"task model it was trained for (gptlab classify / eval)")
    model.requires_grad_(False)
    for name in config.modules_to_save:  # a task head trains whole, as peft's modules_to_save
        model.get_submodule(name).requires_grad_(True)
    for i, block in enumerate(model.transformer.h):
        for layer in layers:
            parent_name, child = layer.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), config.rank, config.scaling, config.dropout))
    model.lora = config
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """gptlab module name -> LoRA layer, e.g. 'transformer.h.0.attn.c_attn'."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight and drop the adapter: a plain GPT, as fast as the base."""
    for name, module in lora_layers(model).items():
        parent_name, child = name.rsplit(".", 1)
        merged = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        merged.weight = nn.Parameter(module.merged_weight().detach(), requires_grad=False)
        merged.bias = module.bias
        setattr(model.get_submodule(parent_name), child, merged)
    if hasattr(model, "lora"):
        del model.lora
    return model


# --- the adapter's tensors --------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under gptlab's names, e.g. 'transformer.h.0.attn.c_attn.lora_A.weight', and
    its task head's whole, e.g. 'score.weight'."""
    state = {f"{name}.{part}.weight": getattr(module, part).weight
             for name, module in lora_layers(model).items() for part in ("lora_A", "lora_B")}
    config = lora_config_of(model)
    for head in config.modules_to_save if config is not None else ():
        state.update({f"{head}.{name}": p for name, p in model.get_submodule(head).named_parameters()})
    return state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a training checkpoint must keep of the model: the adapter alone for a LoRA model (the base is
    frozen and read again from --init-from), else every tensor."""
    if lora_config_of(model) is None:
        return model.state_dict()
    return {name: t.detach().clone() for name, t in adapter_state_dict(model).items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back what `trainable_state` saved (a KeyError or RuntimeError where it does not fit)."""
    if lora_config_of(model) is None:
        model.load_state_dict(state)
        return
    load_adapter_tensors(model, state, "the training state")


def load_adapter_tensors(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors (gptlab's names) into the model's LoRA layers, every name and shape checked."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}, which the model has no layer for"
        raise GptlabError(f"{source}: the adapter does not fit this model: it {what} ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors)")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise GptlabError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model's layer needs "
                              f"{tuple(expected[name].shape)}: an adapter for another base model")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)


def to_peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {PEFT_PREFIX + name: t.detach().to("cpu", torch.float32).contiguous()
            for name, t in adapter_state_dict(model).items()}


def from_peft_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's keys (a GPT2LMHeadModel's or a GPT2Model's, adapter name removed or not) -> gptlab's."""
    converted = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):  # peft's in-memory name, with the adapter's name ("default")
            name = name.replace(f".{part}.default.", f".{part}.")
        if name.startswith("h."):  # an adapter of a GPT2Model: no `transformer.` level
            name = "transformer." + name
        converted[name] = tensor.float()
    return converted


# --- directories ----------------------------------------------------------------------------------


def is_adapter_dir(directory: Path) -> bool:
    """A LoRA adapter (a gptlab LoRA run, or what peft saved) rather than a whole model."""
    return (directory / ADAPTER_CONFIG_FILE).is_file() and not (directory / "config.json").is_file()


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write the adapter as peft does: adapter_config.json and adapter_model.safetensors."""
    config = lora_config_of(model)
    if config is None:
        raise ValueError("save_adapter: the model carries no LoRA adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = to_peft_state_dict(model)
    atomic_write_via(directory / ADAPTER_WEIGHTS_FILE,
                     lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / ADAPTER_CONFIG_FILE, config.peft_config())


def read_adapter(directory: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """An adapter directory's settings and tensors (gptlab's names), refusing what gptlab cannot apply."""
    path = directory / ADAPTER_CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EnvironmentProblem(describe_os_error(exc, path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptlabError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        found = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise GptlabError(f"{path}: expected a LoRA adapter (peft_type 'LORA'), found {found!r}")
    for name in UNSUPPORTED_FIELDS:
        if raw.get(name):
            raise GptlabError(f"{path}: {name}={raw[name]!r} asks for more than plain LoRA, which gptlab does not "
                              f"apply")
    if raw.get("bias", "none") != "none":
        raise GptlabError(f"{path}: bias={raw['bias']!r}: gptlab applies adapters that train no bias ('none')")
    rank, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, (int, float)):
        raise GptlabError(f"{path}: r must be a positive integer and lora_alpha a number, got r={rank!r}, "
                          f"lora_alpha={alpha!r}")
    weights = directory / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise GptlabError(f"{directory}: no {ADAPTER_WEIGHTS_FILE} beside its {ADAPTER_CONFIG_FILE}")
    try:
        state = from_peft_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptlabError(f"{weights}: not a readable safetensors file ({first_line(exc)})") from None
    # the layers come from the tensors themselves: target_modules may be a list, a regex or 'all-linear';
    # the heads too (peft lists every head name a task type may have in modules_to_save)
    heads = tuple(sorted({name.split(".")[0] for name in state if name.split(".")[0] in HEAD_MODULES}))
    layers = {_layer_of(name) for name in state if name.split(".")[0] not in heads}
    if not state or layers - set(LORA_LAYERS):
        other = sorted(str(layer) for layer in layers - set(LORA_LAYERS))[:2]
        raise GptlabError(f"{weights}: adapts {', '.join(other) or 'nothing'}; gptlab adapts the blocks' "
                          f"{', '.join(LORA_LAYERS)}")
    config = LoRAConfig(rank=rank, alpha=float(alpha), dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
                        targets=tuple(sorted(layers)), base=raw.get("base_model_name_or_path") or "",
                        rslora=bool(raw.get("use_rslora")), modules_to_save=heads, task_type=raw.get("task_type"))
    return config, state


def _layer_of(name: str) -> str:
    """'transformer.h.3.attn.c_attn.lora_A.weight' -> 'attn.c_attn'; any other tensor keeps its whole name."""
    parts = name.split(".")
    if len(parts) != 7 or parts[:2] != ["transformer", "h"] or parts[5:] not in (["lora_A", "weight"],
                                                                                 ["lora_B", "weight"]):
        return name
    return ".".join(parts[3:5])


def apply_adapter(model: GPT, directory: str | Path) -> GPT:
    """Give `model` (the adapter's base) the adapter saved in `directory`, unmerged; returns `model`."""
    directory = Path(directory)
    config, state = read_adapter(directory)
    apply_lora(model, config)
    load_adapter_tensors(model, state, str(directory / ADAPTER_WEIGHTS_FILE))
    model.eval()
    return model
