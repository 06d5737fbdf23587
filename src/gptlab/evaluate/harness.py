"""gptlab as an lm-evaluation-harness model: `--model gptlab --model_args pretrained=RUN`.

lm-eval asks a model three things. `loglikelihood`: ln P(continuation | context) and whether the
continuation is the greedy one (multiple choice, LAMBADA). `loglikelihood_rolling`: ln P(document),
read in disjoint windows of the context (WikiText). `generate_until`: text generated until a stop
string. Here all three run on gptlab's own model and tokenizer, GPT-2 BPE and character-level runs
alike: the two likelihoods through the one scorer (`scorer.token_nll`, the LM head only at the
continuation's positions), generation through gptlab's cached decoding (`inference.complete`, all
prompts of a batch in one KV cache).

The inputs are exactly those of lm-eval's `hf` model (the same truncation from the left to the
context, the same rolling windows, the same end-of-text prefix for an empty context, the same stop
strings), so on a run Hugging Face can load both give the same scores (tests/evaluate/test_harness.py).

A character-level vocabulary knows only its corpus's characters: the others are left out of the text
before it is encoded (their probability under the model is zero), and a warning names them.

lm-eval finds this class by name through its registry: importing this module registers it. lm-eval
releases with plugin discovery find it through the `lm_eval.models` entry point in pyproject.toml;
with lm-eval 0.4.13, which has none, `python -m gptlab.evaluate.lm_eval_cli` is the `lm_eval` command
with the registration done (same arguments), and `gptlab eval RUN --tasks ...` calls lm-eval's API.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..errors import GptlabError
from ..inference import SamplingParams, complete
from ..inference.loading import DTYPES, load_pretrained
from ..model import GPT
from ..tokenizers import CharTokenizer, Tokenizer, document_start_ids
from .scorer import token_nll

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for a task that sets none


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """A gptlab model and its tokenizer, answering lm-eval's requests in batches of `batch_size`."""

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        model: GPT | None = None,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device | None = None,
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        dtype: str = "float32",
        max_batch_size: int | str | None = None,  # lm-eval passes it to every model; batches are fixed here
    ) -> None:
        super().__init__()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():  # lm_eval's command line says cuda
            log.warning("CUDA is not available on this machine: evaluating on the CPU")
            self._device = torch.device("cpu")
        if dtype not in DTYPES:
            raise GptlabError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if model is None:
            if pretrained is None:
                raise GptlabError("the gptlab model needs pretrained=RUN_DIR (a run or a Hugging Face GPT-2 directory)")
            model, tokenizer = load_pretrained(pretrained, self._device, dtype=dtype)
        elif tokenizer is None:
            raise GptlabError("a gptlab model given as an object needs its tokenizer too")
        else:
            model = model.to(self._device, getattr(torch, dtype)).eval()
        self.model = model
        self.gptlab_tokenizer = tokenizer
        self.name = str(pretrained) if pretrained is not None else "gptlab model"
        self._batch_size = _positive(batch_size, "batch_size", DEFAULT_BATCH_SIZE, allow_auto=True)
        self._max_length = _positive(max_length, "max_length", model.config.block_size)
        if self._max_length > model.config.block_size:
            raise GptlabError(f"max_length {self._max_length} exceeds the model's context of {model.config.block_size}")
        self._max_gen_toks = _positive(max_gen_toks, "max_gen_toks", DEFAULT_MAX_GEN_TOKS)
        self._chars = set(tokenizer.chars) if isinstance(tokenizer, CharTokenizer) else None
        self._unknown_chars: set[str] = set()

    # --- what lm-eval reads off a model ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """GPT-2's end-of-text; for a character vocabulary, what an empty prompt means (a newline)."""
        return document_start_ids(self.gptlab_tokenizer)[0]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if self._chars is not None:
            known = "".join(c for c in string if c in self._chars)
            if len(known) != len(string):
                self._unknown_chars.update(c for c in string if c not in self._chars)
                string = known
        return self.gptlab_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int] | int, **kwargs) -> str:
        return self.gptlab_tokenizer.decode([tokens] if isinstance(tokens, int) else tokens)

    def get_model_info(self) -> dict:
        config = self.model.config
        return {"model_name": self.name, "model_num_parameters": self.model.num_parameters(),
                "model_tokenizer": self.gptlab_tokenizer.name, "model_context": config.block_size}

    # --- likelihoods ----------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        """(ln P(continuation | context), greedy?) per (key, context ids, continuation ids) request."""
        def longest_first(request):
            ids = request[1] + request[2]
            return -len(ids), tuple(ids)

        order = Collator(requests, sort_fn=longest_first)
        results: list[tuple[float, bool]] = []
        with tqdm(total=len(requests), desc="gptlab loglikelihood", disable=disable_tqdm) as bar:
            for batch in order.get_batched(n=self.batch_size):
                for (key, _, _), answer in zip(batch, self._score_batch([(c, t) for _, c, t in batch])):
                    results.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(len(batch))
        self._warn_unknown_chars()
        return order.get_original(results)

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Each (context, continuation) as one row, right-padded, cut from the left to the context."""
        rows, scored = [], []
        for context, continuation in pairs:
            if not context or not continuation or len(continuation) > self.max_length:
                raise GptlabError(f"a request needs a context and a continuation of 1 to {self.max_length} tokens")
            ids = (context + continuation)[-(self.max_length + 1):]
            rows.append(ids)
            scored.append(len(continuation))
        width = max(len(ids) for ids in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
        y = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
        where = torch.zeros(len(rows), width, dtype=torch.bool)  # (B, T): the continuation's targets
        for row, (ids, n) in enumerate(zip(rows, scored)):
            x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, : len(ids) - 1] = torch.tensor(ids[1:])
            where[row, len(ids) - 1 - n : len(ids) - 1] = True
        nll, greedy = token_nll(self.model, x.to(self.device), y.to(self.device), where.to(self.device), greedy=True)
        answers, start = [], 0
        for n in scored:  # the scored positions come row by row
            answers.append((-float(nll[start : start + n].double().sum()), bool(greedy[start : start + n].all())))
            start += n
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """ln P(text) of each whole text: disjoint windows of the context, the first after end-of-text."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string (and end-of-text), at most max_gen_toks tokens."""
        order = Collator([request.args for request in requests], sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
                         group_by="gen_kwargs", group_fn=lambda args: args[1])
        eos = self.tok_decode(self.eot_token_id) if self.gptlab_tokenizer.eos_id is not None else None
        results = []
        with tqdm(total=len(requests), desc="gptlab generate_until", disable=disable_tqdm) as bar:
            for batch in order.get_batched(n=self.batch_size):
                contexts, kwargs = [args[0] for args in batch], normalize_gen_kwargs(batch[0][1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = kwargs.pop("max_gen_toks")
                room = self.max_length - max_new
                if room < 1:
                    raise GptlabError(f"max_gen_toks {max_new} leaves no room for a prompt in the context of {self.max_length}")
                params = SamplingParams(max_new_tokens=max_new, temperature=float(kwargs.get("temperature", 0.0)),
                                        top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), stop=tuple(until))
                prompts = [self.tok_encode(context)[-room:] or [self.prefix_token_id] for context in contexts]
                for context, args, done in zip(contexts, batch, complete(self.model, self.gptlab_tokenizer, prompts, params)):
                    text = postprocess_generated_text(done.text, until, None)
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", args, text)
                bar.update(len(batch))
        self._warn_unknown_chars()
        return order.get_original(results)

    def _warn_unknown_chars(self) -> None:
        if self._unknown_chars:
            shown = "".join(sorted(self._unknown_chars))[:40]
            log.warning("%s: %d characters outside the model's vocabulary were left out of the texts: %r",
                        self.name, len(self._unknown_chars), shown)
            self._unknown_chars.clear()


def _positive(value: int | str | None, name: str, default: int, allow_auto: bool = False) -> int:
    """A model_args value (a string from the command line) as a positive int; None (or auto) is the default."""
    if value is None or (allow_auto and str(value).startswith("auto")):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise GptlabError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise GptlabError(f"{name} must be a positive integer, got {value!r}")
    return number
