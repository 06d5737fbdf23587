"""gptlab's lm-eval model against lm-eval's `hf` model on the same run directory, side by side.

A GPT-2-BPE model (6 layers, 256 wide, context 256, random weights: speed does not depend on them) is
saved as a run directory that both load. The same lm-eval requests go to both, batch size 16, float32
on the CPU, in one process, alternating which goes first over the rounds:

- loglikelihood: 192 (context, continuation) pairs, contexts of 60-200 tokens, continuations of 1-8
  (HellaSwag's and LAMBADA's shape);
- loglikelihood_rolling: 6 documents of about 1,500 tokens (WikiText's shape);
- generate_until: 16 prompts, 32 greedy tokens each, no stop string met.

Reported: requests per second (the best of the rounds) and the speed-up hf time / gptlab time. The
answers are checked equal (log-likelihoods within 1e-4, or 1e-6 relative for a document's sum of
1,500 float32 terms; tests/test_harness.py checks 1e-4 on real tasks). About 3-4
minutes on 2 cores. (Named lm_eval_model.py: a benchmarks/lm_eval.py would shadow the lm_eval package,
a script's folder coming first on sys.path.)

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/lm_eval_model.py
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from gptlab.checkpoint import save_model  # noqa: E402
from gptlab.config import GPTConfig  # noqa: E402
from gptlab.evaluate.harness import GptlabLM  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.tokenizers import GPT2Tokenizer  # noqa: E402

from machine import MACHINE  # noqa: E402  (benchmarks/machine.py: a script's own folder is on sys.path)

RESULTS = Path(__file__).parent / "results"
ROUNDS = 3
BATCH = 16
CONFIG = GPTConfig(vocab_size=50257, block_size=256, n_layer=6, n_head=8, n_embd=256)


def requests(tokenizer: GPT2Tokenizer) -> dict[str, list[Instance]]:
    rng = random.Random(0)
    words = [tokenizer.decode([rng.randrange(300, 20000)]) for _ in range(20000)]

    def text(n_tokens: int) -> str:
        return "".join(rng.choice(words) for _ in range(n_tokens))

    loglikelihood = [Instance("loglikelihood", {}, (text(rng.randint(60, 200)), text(rng.randint(1, 8))), i)
                     for i in range(192)]
    rolling = [Instance("loglikelihood_rolling", {}, (text(1500),), i) for i in range(6)]
    until = {"until": ["@@@never@@@"], "max_gen_toks": 32, "do_sample": False}
    generate = [Instance("generate_until", {}, (text(rng.randint(40, 120)), until), i) for i in range(16)]
    return {"loglikelihood": loglikelihood, "loglikelihood_rolling": rolling, "generate_until": generate}


def close(a, b) -> bool:
    """Equal texts; log-likelihoods within 1e-4 or, for long sums (a 1,500-token document), 1e-6 relative."""
    if isinstance(a, str):
        return a == b
    if isinstance(a, tuple):
        return close(a[0], b[0]) and a[1] == b[1]
    return abs(a - b) <= max(1e-4, 1e-6 * abs(b))


def number(answer) -> float:
    """The log-likelihood in an answer: a float, or the first of (log-likelihood, is_greedy)."""
    return answer[0] if isinstance(answer, tuple) else answer


def main() -> None:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        torch.manual_seed(0)
        save_model(GPT(CONFIG), run)
        GPT2Tokenizer().save(run)
        models = {"gptlab": GptlabLM(pretrained=run, device="cpu", batch_size=BATCH),
                  "hf": HFLM(pretrained=str(run), device="cpu", batch_size=BATCH, dtype="float32")}
        work = requests(GPT2Tokenizer())
        rows = {}
        for kind, batch in work.items():
            best = {name: float("inf") for name in models}
            answers = {}
            for round_ in range(ROUNDS):
                for name in (list(models) if round_ % 2 == 0 else list(models)[::-1]):
                    start = time.perf_counter()
                    answers[name] = getattr(models[name], kind)(batch, disable_tqdm=True)
                    best[name] = min(best[name], time.perf_counter() - start)
            pairs = list(zip(answers["gptlab"], answers["hf"], strict=True))
            agree = all(close(a, b) for a, b in pairs)
            gaps = [abs(number(a) - number(b)) for a, b in pairs if not isinstance(a, str)]
            rows[kind] = {"requests": len(batch), **{f"{name}_requests_per_s": len(batch) / t for name, t in best.items()},
                          "speedup": best["hf"] / best["gptlab"], "answers_agree": agree,
                          "largest_difference": max(gaps, default=None),
                          "largest_relative_difference": max((abs(number(a) - number(b)) / max(abs(number(b)), 1e-30)
                                                              for a, b in pairs if not isinstance(a, str)), default=None)}
            print(kind, rows[kind], flush=True)
    results = {"machine": MACHINE, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "model": "GPT-2 BPE, 6 layers, 256 wide, context 256", "batch_size": BATCH, "rounds": ROUNDS,
               "load_before": load_before, "load_after": round(os.getloadavg()[0], 2), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_eval_model.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"gptlab's lm-eval model against lm-eval's `hf` model ({MACHINE}; {results['threads']} threads; load "
             f"{load_before} before, {results['load_after']} after). {results['model']}, batch {BATCH}, float32, "
             f"best of {ROUNDS} rounds.", "",
             "| request type | requests | gptlab req/s | hf req/s | gptlab speed-up | answers agree | largest difference "
             "(relative) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    lines += [f"| {kind} | {r['requests']} | {r['gptlab_requests_per_s']:.2f} | {r['hf_requests_per_s']:.2f} | "
              f"{r['speedup']:.2f}x | {'yes' if r['answers_agree'] else 'NO'} | " + (
                  "texts" if r["largest_difference"] is None
                  else f"{r['largest_difference']:.2e} ({r['largest_relative_difference']:.1e})") + " |"
              for kind, r in rows.items()]
    (RESULTS / "lm_eval_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
