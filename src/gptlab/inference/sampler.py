"""Next tokens for a whole batch in one pass, every row under its own sampling parameters.

Each row's logits go through, in this order: logit_bias; min_tokens (eos and the stop ids cannot
come yet); the repetition penalty (CTRL's: a seen token's logit is divided by the penalty if positive,
multiplied if negative; "seen" is the prompt and the output); the presence and frequency penalties
(OpenAI's: minus presence once for a token generated before, minus frequency per time); temperature
(0 is greedy: the argmax); top-k; top-p (the smallest set of tokens whose probability reaches top_p;
the most likely token always stays). Then one uniform number per row, drawn from that row's own
generator, picks the token by inverting the row's cumulative distribution.

A row's token therefore depends on its own logits, parameters and generator only: a seeded row
draws the same text alone or in any batch. The work is vectorised over rows (no Python loop touches
the vocabulary), and rows whose parameters need nothing cost nothing: without penalties there is
no penalty state, without top-p no sort.

Extreme values in range stay finite: the temperature divides logits from which the row's maximum
was subtracted (so the largest is 0 and nothing overflows to +inf), penalties and temperatures are
clamped to float32's normal range, and +inf from a penalty becomes the largest float.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

_TINY = torch.finfo(torch.float32).tiny
_HUGE = torch.finfo(torch.float32).max


@dataclass
class TokenLogprobs:
    """What the model thought at one position: the token's log-probability and the most likely ones."""

    token: int
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: dict[int, float]  # the N most likely ids at this position, with their log-probabilities


class Sampler:
    """Holds the per-slot penalty state of the engine's batch and samples every row of a step.

    `rows` are the engine's running sequences in slot order; each has `params`, `prompt`, `token_ids`,
    `generator` and `stop_ids`.
    """

    def __init__(self, vocab_size: int, slots: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.slots = slots
        self.device = device
        self.seen: torch.Tensor | None = None  # (slots, V) bool: in the prompt or the output
        self.counts: torch.Tensor | None = None  # (slots, V) float32: times generated
        self._plan: _Plan | None = None
        self._members: tuple[int, ...] = ()

    # -- the per-slot state, kept in step with the engine's slots ------------------------------------

    def join(self, slot: int, row) -> None:
        """A sequence takes `slot`: its penalty state starts from its prompt."""
        p = row.params
        if p.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.slots, self.vocab_size, dtype=torch.bool, device=self.device)
        if (p.presence_penalty or p.frequency_penalty) and self.counts is None:
            self.counts = torch.zeros(self.slots, self.vocab_size, device=self.device)
        if self.seen is not None:
            self.seen[slot] = False
            self.seen[slot, torch.tensor(row.prompt + row.token_ids, device=self.device)] = True
        if self.counts is not None:
            self.counts[slot] = 0
            if row.token_ids:
                self.counts[slot].index_put_((torch.tensor(row.token_ids, device=self.device),),
                                             torch.ones(len(row.token_ids), device=self.device), accumulate=True)

    def move(self, source: int, target: int) -> None:
        for state in (self.seen, self.counts):
            if state is not None:
                state[target] = state[source]

    def swap(self, a: int, b: int) -> None:
        for state in (self.seen, self.counts):
            if state is not None:
                state[[a, b]] = state[[b, a]]

    def release(self) -> None:
        """Nothing runs: drop the penalty state (the next sequence that needs it allocates it again)."""
        self.seen = self.counts = None
        self._plan, self._members = None, ()

    # -- sampling -----------------------------------------------------------------------------------

    def __call__(self, logits: torch.Tensor, rows: Seq) -> torch.Tensor:
        """(B, V) logits of the rows, in slot order -> (B,) next tokens; updates the penalty state."""
        plan = self._plan_for(rows)
        x = self.processed(logits, rows)  # (B, V)
        tokens = x.argmax(dim=-1)  # (B,): the greedy rows' tokens, and a placeholder for the others
        if plan.sampled is not None:
            tokens[plan.sampled] = self._sample(x if plan.all_sample else x[plan.sampled], plan)
        if self.seen is not None or self.counts is not None:
            slots = torch.arange(len(rows), device=x.device)
            if self.seen is not None:
                self.seen[slots, tokens] = True
            if self.counts is not None:
                self.counts[slots, tokens] += 1
        return tokens

    def processed(self, logits: torch.Tensor, rows: Seq) -> torch.Tensor:
        """The rows' logits after logit_bias, min_tokens and the penalties, as float32 with no NaN or +inf."""
        plan = self._plan_for(rows)
        n = logits.size(0)
        x = logits.float()  # (B, V); the ops below never write into the model's logits
        if plan.bias is not None:
            x = x.index_put(plan.bias[:2], plan.bias[2], accumulate=True)
        if plan.min_tokens:
            banned = [(j, t) for j, r in enumerate(rows) if len(r.token_ids) < r.params.min_tokens for t in r.stop_ids]
            if banned:
                index = torch.tensor(banned, device=x.device).t()  # (2, K)
                x = x.index_put((index[0], index[1]), torch.tensor(float("-inf"), device=x.device))
        if plan.repetition is not None:
            penalty = plan.repetition[:, None]  # (B, 1)
            x = torch.where(self.seen[:n], torch.where(x > 0, x / penalty, x * penalty), x)
        if plan.presence is not None:
            counts = self.counts[:n]  # (B, V)
            x = x - plan.frequency[:, None] * counts - plan.presence[:, None] * (counts > 0)
        return x.nan_to_num(nan=float("-inf"), posinf=_HUGE, neginf=float("-inf"))

    def _plan_for(self, rows: Seq) -> _Plan:
        members = tuple(id(r) for r in rows)
        if members != self._members:
            self._plan, self._members = _Plan(rows, self.vocab_size, self.device), members
        return self._plan

    @staticmethod
    def _sample(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """(S, V) processed logits of the rows that sample -> (S,) tokens."""
        x = (x - x.amax(dim=-1, keepdim=True)) / plan.temperature[:, None]  # (S, V), the largest is 0
        if plan.top_k is not None:
            k, has_k = plan.top_k
            kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (S, 1)
            x = x.masked_fill(x < torch.where(has_k[:, None], kth, float("-inf")), float("-inf"))
        probs = x.softmax(dim=-1)  # (S, V)
        if plan.top_p is not None:
            which, p = plan.top_p  # rows (among the sampled ones) with top_p < 1, and their top_p
            nucleus = probs[which]
            ordered, order = nucleus.sort(dim=-1, descending=True, stable=True)
            # drop a token when the mass before it already reaches top_p; the top token always stays
            drop = (ordered.cumsum(dim=-1) - ordered) >= p[:, None]
            drop[:, 0] = False
            probs[which] = nucleus.masked_fill(drop.scatter(1, order, drop), 0.0)
        cdf = probs.double().cumsum(dim=-1)  # (S, V); float64 so that tail tokens keep their share
        u = plan.uniforms()  # (S,) in [0, 1)
        picked = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True)  # (S, 1)
        return picked[:, 0].clamp_(max=x.size(-1) - 1)


class _Plan:
    """The batch's parameters as tensors, rebuilt only when the batch's members change."""

    def __init__(self, rows: Seq, vocab_size: int, device: torch.device) -> None:
        params = [r.params for r in rows]
        sampled = [j for j, p in enumerate(params) if p.temperature > 0]
        self.all_sample = len(sampled) == len(rows)
        self.sampled = torch.tensor(sampled, device=device) if sampled else None
        self._generators = [rows[j].generator for j in sampled]
        chosen = [params[j] for j in sampled]
        self.temperature = torch.tensor([p.temperature for p in chosen], device=device).clamp_(_TINY, _HUGE)
        self.top_k = None
        if any(p.top_k is not None and p.top_k < vocab_size for p in chosen):
            k = [min(p.top_k or vocab_size, vocab_size) for p in chosen]
            self.top_k = (torch.tensor(k, device=device), torch.tensor([v < vocab_size for v in k], device=device))
        self.top_p = None
        nucleus = [(j, p.top_p) for j, p in enumerate(chosen) if p.top_p is not None and p.top_p < 1]
        if nucleus:
            self.top_p = (torch.tensor([j for j, _ in nucleus], device=device),
                          torch.tensor([p for _, p in nucleus], device=device))
        self.repetition = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.repetition = torch.tensor([p.repetition_penalty for p in params], device=device).clamp_(_TINY, _HUGE)
        self.presence = self.frequency = None
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self.presence = torch.tensor([float(p.presence_penalty) for p in params], device=device)
            self.frequency = torch.tensor([float(p.frequency_penalty) for p in params], device=device)
        self.bias = None
        biased = [(j, t, b) for j, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        if biased:
            self.bias = (torch.tensor([j for j, _, _ in biased], device=device),
                         torch.tensor([t for _, t, _ in biased], device=device),
                         torch.tensor([float(b) for _, _, b in biased], device=device))
        self.min_tokens = any(p.min_tokens > 0 for p in params)

    def uniforms(self) -> torch.Tensor:
        """One number in [0, 1) per sampling row, from the row's generator (None: torch's global RNG).

        Rows that share a generator (`generate(..., generator=g)` for a batch) draw from it in row order.
        """
        u = torch.empty(len(self._generators), dtype=torch.float64)
        groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for j, g in enumerate(self._generators):
            groups.setdefault(id(g), (g, []))[1].append(j)
        for g, js in groups.values():
            device = "cpu" if g is None else g.device
            u[js] = torch.rand(len(js), generator=g, dtype=torch.float64, device=device).cpu()
        return u


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: Seq[int]) -> list[TokenLogprobs]:
    """The model's own log-probabilities (before any sampling control) of `tokens`, with each row's
    top[r] most likely alternatives and the token itself: (B, V) logits, (B,) tokens."""
    logp = logits.float().log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    n = max(top, default=0)  # no rows: a one-token prompt has no log-probabilities to give
    values, ids = logp.topk(n, dim=-1) if n else (logp[:, :0], tokens[:, None][:, :0])
    values, ids = values.tolist(), ids.tolist()
    out = []
    for t, lp, i, v, k in zip(tokens.tolist(), chosen, ids, values, top):
        alternatives = dict(zip(i[:k], v[:k]))
        alternatives.setdefault(t, lp)  # as vLLM: the chosen token is always among them
        out.append(TokenLogprobs(t, lp, alternatives))
    return out
