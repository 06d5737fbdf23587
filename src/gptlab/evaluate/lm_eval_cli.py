"""`python -m gptlab.evaluate.lm_eval_cli ARGS`: lm-eval's own `lm_eval` command, with `--model gptlab`.

lm-eval 0.4.13 looks models up in a registry filled only by its own modules and by the modules a
program imports; it discovers no plugins. This is its command line after importing gptlab's model,
so `--model gptlab --model_args pretrained=RUN,batch_size=16 --tasks hellaswag` and every other
lm_eval option work as documented by lm-eval. Releases that discover `lm_eval.models` entry points
find gptlab's (pyproject.toml) and need no wrapper: plain `lm_eval --model gptlab` works there.
"""

from __future__ import annotations

import sys

from ..errors import GptlabError
from .tasks import require_lm_eval


def main() -> int:
    try:
        require_lm_eval()
        from lm_eval.__main__ import cli_evaluate

        from . import harness  # noqa: F401  (registers "gptlab" with lm-eval)

        return cli_evaluate() or 0
    except GptlabError as exc:
        print(f"lm_eval (gptlab): error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
