"""GPT-1's task heads: a pretrained GPT, one small layer on top, fine-tuned on a labelled task.

Radford et al. (2018), "Improving Language Understanding by Generative Pre-Training", sec. 3.2: the
final state of an input's last token goes through one new linear layer to the task's classes, and
everything is fine-tuned on the task; the language-modelling loss on the same inputs is kept as an
auxiliary objective, L3 = L2 + lambda * L1 (lambda = 0.5 there), which the paper found to help
generalisation and speed up convergence. Sec. 3.3 turns other tasks into that shape: multiple choice
is the context followed by a delimiter and each choice in turn, each scored alone and the scores
normalised with a softmax over the choices.

The two classes follow Hugging Face's, so their weights are the same tensors under the same names:
`SequenceClassifier` is `GPT2ForSequenceClassification` (a bias-free `score` layer, read at the last
token that is not padding), `MultipleChoice` is `GPT2DoubleHeadsModel` (a `multiple_choice_head` with
a bias, read at a given position of each choice). Both are GPTs (their body, LM head and LoRA are
GPT's) whose forward pass returns a `TaskOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .model import GPT

# The modules a head adds to a GPT (what a LoRA run trains besides its adapters: peft's modules_to_save).
HEAD_MODULES = ("score", "multiple_choice_head")


@dataclass
class TaskOutput:
    logits: torch.Tensor  # (B, num_labels) or (B, num_choices): the task's scores, before the softmax
    loss: torch.Tensor | None = None  # task_loss + lm_loss_weight * lm_loss, when labels are given
    task_loss: torch.Tensor | None = None  # mean cross-entropy of the labels
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy over the inputs (not the padding)
    lm_logits: torch.Tensor | None = None  # (..., T, vocab_size), when asked for or the LM loss needs them


def last_non_padding(idx: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B, T) -> (B,): each row's rightmost position whose token is not `pad_token_id` (0 for a row of
    padding only), exactly as GPT2ForSequenceClassification picks it; without a pad id, the last one."""
    B, T = idx.shape
    if pad_token_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
    positions = torch.arange(T, device=idx.device)  # (T,)
    return (positions * (idx != pad_token_id)).argmax(-1)  # (B,)


def next_token_loss(lm_logits: torch.Tensor, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """GPT-1's L1 on the inputs themselves: positions 0 .. last-1 predict tokens 1 .. last of each row.

    lm_logits (N, T, V), idx (N, T), last (N,): the padding after `last` is never a target."""
    T = idx.size(1)
    targets = idx[:, 1:].masked_fill(torch.arange(1, T, device=idx.device) > last[:, None], -100)  # (N, T-1)
    return F.cross_entropy(lm_logits[:, :-1].reshape(-1, lm_logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=-100)


class _TaskModel(GPT):
    """What both heads share: the auxiliary loss's weight, and a body taken over from a pretrained GPT."""

    lm_loss_weight: float

    def _new_head(self) -> None:
        raise NotImplementedError

    def _combine(self, logits: torch.Tensor, labels: torch.Tensor | None, lm_logits: torch.Tensor | None,
                 idx: torch.Tensor, last: torch.Tensor) -> TaskOutput:
        out = TaskOutput(logits=logits, lm_logits=lm_logits)
        if labels is None:
            return out
        out.task_loss = F.cross_entropy(logits.float(), labels)
        out.loss = out.task_loss
        if self.lm_loss_weight:
            out.lm_loss = next_token_loss(lm_logits, idx, last)
            out.loss = out.task_loss + self.lm_loss_weight * out.lm_loss
        return out


def with_head(body: GPT, cls: type[_TaskModel], **head: object) -> _TaskModel:
    """A task model whose body is `body`'s very tensors (no copy) and whose head is freshly initialised:
    how a pretrained GPT becomes a classifier to fine-tune. The model is built on the meta device, so no
    second set of weights is ever initialised."""
    with torch.device("meta"):
        model = cls(GPTConfig(**body.config.to_dict()), **head)
    unexpected = model.load_state_dict(body.state_dict(), strict=False, assign=True).unexpected_keys
    if unexpected:
        raise ValueError(f"with_head: the body holds tensors a {cls.__name__} lacks: {unexpected[:3]}")
    model.lm_head.weight = model.transformer.wte.weight  # re-tie to the taken-over embedding
    with torch.device(body.transformer.wte.weight.device):
        model._new_head()
    return model.train(body.training)


class SequenceClassifier(_TaskModel):
    """A GPT whose last non-padding token's final state, through `score`, gives one logit per label.

    Reading the last token is what a causal model allows: only it has seen the whole input. Inputs are
    padded on the right with `pad_token_id`; under causal attention the padding changes nothing before it.
    """

    def __init__(self, config: GPTConfig, labels: Sequence[str], pad_token_id: int | None,
                 lm_loss_weight: float = 0.0) -> None:
        super().__init__(config)
        self.labels = tuple(labels)
        self.pad_token_id = pad_token_id
        self.lm_loss_weight = lm_loss_weight
        self._new_head()

    def _new_head(self) -> None:
        self.score = nn.Linear(self.config.n_embd, len(self.labels), bias=False)  # (C) -> (num_labels)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None, *,
                with_lm_logits: bool = False) -> TaskOutput:
        """idx (B, T) padded on the right, labels (B,) class indices -> logits (B, num_labels)."""
        hidden = self.hidden_states(idx)  # (B, T, C)
        last = last_non_padding(idx, self.pad_token_id)  # (B,)
        pooled = hidden[torch.arange(idx.size(0), device=idx.device), last]  # (B, C)
        logits = self.score(pooled)  # (B, num_labels)
        needs_lm = with_lm_logits or (labels is not None and self.lm_loss_weight > 0)
        lm_logits = self.lm_head(hidden) if needs_lm else None  # (B, T, vocab_size)
        return self._combine(logits, labels, lm_logits, idx, last)


class ChoiceSummary(nn.Module):
    """GPT2DoubleHeadsModel's SequenceSummary as GPT-2 configures it (cls_index, a projection to 1, no
    activation): dropout, then one score per choice from the state at the extract token."""

    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.first_dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(n_embd, 1)  # (C) -> (1), with a bias, as Hugging Face's
        nn.init.normal_(self.summary.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.summary.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.summary(self.first_dropout(pooled)).squeeze(-1)  # (B, N, C) -> (B, N)


class MultipleChoice(_TaskModel):
    """GPT-1's multiple choice: each choice read alone (context, delimiter, choice, extract token), one
    score per choice at its extract token, a softmax over the choices. The LM head stays tied to the
    embedding, so the auxiliary LM loss comes with the same weights."""

    def __init__(self, config: GPTConfig, lm_loss_weight: float = 0.0) -> None:
        super().__init__(config)
        self.lm_loss_weight = lm_loss_weight
        self._new_head()

    def _new_head(self) -> None:
        self.multiple_choice_head = ChoiceSummary(self.config.n_embd, self.config.dropout)

    def forward(self, idx: torch.Tensor, mc_token_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                with_lm_logits: bool = False) -> TaskOutput:
        """idx (B, N, T): N choices per example, mc_token_ids (B, N): each one's extract position,
        labels (B,): the right choice -> logits (B, N)."""
        B, N, T = idx.shape
        flat = idx.reshape(B * N, T)  # (B*N, T): every choice is its own sequence
        hidden = self.hidden_states(flat).view(B, N, T, -1)  # (B, N, T, C)
        where = mc_token_ids[:, :, None, None].expand(B, N, 1, hidden.size(-1))  # (B, N, 1, C)
        logits = self.multiple_choice_head(hidden.gather(2, where).squeeze(2))  # (B, N)
        needs_lm = with_lm_logits or (labels is not None and self.lm_loss_weight > 0)
        lm_logits = self.lm_head(hidden) if needs_lm else None  # (B, N, T, vocab_size)
        flat_logits = None if lm_logits is None else lm_logits.view(B * N, T, -1)
        out = self._combine(logits, labels, flat_logits, flat, mc_token_ids.reshape(B * N))
        out.lm_logits = lm_logits
        return out


def head_kind(model: GPT) -> str | None:
    """"classify", "choice", or None for a plain language model."""
    if isinstance(model, SequenceClassifier):
        return "classify"
    if isinstance(model, MultipleChoice):
        return "choice"
    return None

