"""How good is a language model: one scorer for every loss gptlab reports, whole-split perplexity against
n-gram baselines, and (with the `eval` extra) lm-evaluation-harness tasks on any gptlab model.

- `scorer`: `token_nll`, the one scorer, and the sliding-window reading of a token stream (`score`).
- `perplexity`: `gptlab eval MODEL --data/--text`.
- `ngram`, `baselines`: Kneser-Ney models and their scores on the same targets.
- `harness`, `tasks`: the lm-eval model class (`--model gptlab`) and `gptlab eval RUN --tasks`; they
  import lm_eval, so nothing here imports them.
"""

from .baselines import baseline_rows, ngram_scores, score_ngram
from .perplexity import Evaluation, evaluate_model, load_eval_input, markdown_table
from .scorer import Score, score, score_tokens, text_lengths, token_nll, windows

__all__ = [
    "Evaluation", "Score", "baseline_rows", "evaluate_model", "load_eval_input", "markdown_table", "ngram_scores",
    "score", "score_ngram", "score_tokens", "text_lengths", "token_nll", "windows",
]
