"""`make demo` (`gptlab train`, no arguments) on this machine as it is, and with 4 busy loops beside it.

Issue 13: under load the demo once gave 117 steps in 4.6 minutes and a model worse than a bigram. Each
variant runs the real command line in a fresh process, in a scratch directory where the built-in corpus
is prepared once beforehand (not timed), and reads the run's report.json: steps, validation perplexity
on the report's 100,000 characters, the Kneser-Ney bigram's and the best n-gram's (orders 2-6) on the
same characters, the optimizer the recipe took (Muon, or AdamW where Muon does not pay) and whether the
run warned of a busy CPU. On an AVX2-only CPU, emulate one elsewhere with
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` in the environment. The load variants start `python -c 'while True: pass'` processes (4 by default:
load 4 on top of whatever else runs) and stop them after. `--without-adapt` adds the loaded run with
`--no-adapt-threads`, to show what choosing the thread count by measurement buys.

Bounded: each run is 4 minutes of training plus its set-up and report, about 5 to 6 minutes; the two
default variants take about 12 minutes, 18 with `--without-adapt`.

    flock /tmp/gptlab-bench.lock .venv/bin/python benchmarks/demo_load.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptlab.train.setup import DEFAULT_DATA_DIR

from machine import MACHINE, save_results  # benchmarks/machine.py: a script's own folder is on sys.path

GPTLAB = [sys.executable, "-m", "gptlab"]
SPIN = "while True: pass"


def run_demo(work: Path, spinners: int, extra: list[str]) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(spinners)]
    try:
        time.sleep(2 if spinners else 0)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run([*GPTLAB, "train", "--no-progress", *extra], cwd=work, capture_output=True, text=True)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    finally:
        for process in busy:
            process.kill()
            process.wait()
    if done.returncode:
        raise SystemExit(f"gptlab train failed:\n{done.stderr[-2000:]}")
    run_dir = Path(work, done.stdout.split()[1].rstrip(":"))  # "run runs/shakespeare-char-default-N: ..."
    facts = json.loads((run_dir / "report.json").read_text())
    warning = next((line for line in done.stderr.splitlines() if "warning: the CPU was busy" in line), "")
    return {
        "spinners": spinners, "options": extra, "load_before": round(load_before, 2),
        "load_after": round(load_after, 2), "wall_s": round(wall, 1), "steps": facts["steps"],
        "train_seconds": round(facts["seconds"], 1), "val_perplexity": round(facts["val_perplexity"], 3),
        "bigram_val_perplexity": round(facts["bigram_val_perplexity"], 3), "busy_warning": warning,
        "best_ngram": f"{facts['best_ngram_val_perplexity']:.2f} ({facts['best_ngram_order']}-gram)",
        "verdict": facts["verdict"], "optimizer": json.loads((run_dir / "train_config.json").read_text())["optimizer"],
        "threads": [line for line in done.stderr.splitlines() if line.startswith("--adapt-threads")],
    }


def table(rows: list[dict]) -> str:
    lines = [f"`make demo` (preset shakespeare-char-default, 4 minutes of training) on {MACHINE}. Load averages"
             " (1 minute) before and after each run include the other work on the machine.", "",
             "| variant | load before / after | optimizer | steps | validation perplexity | bigram | best n-gram | "
             "wall (s) | busy warning |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        name = f"{row['spinners']} busy loops" + (f" {' '.join(row['options'])}" if row["options"] else "")
        lines.append(f"| {name} | {row['load_before']} / {row['load_after']} | {row['optimizer']} | {row['steps']:,} | "
                     f"**{row['val_perplexity']:.2f}** | {row['bigram_val_perplexity']:.2f} | {row['best_ngram']} | "
                     f"{row['wall_s']:.0f} | "
                     f"{'yes' if row['busy_warning'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spinners", type=int, default=4, help="busy loops beside the loaded runs")
    parser.add_argument("--without-adapt", action="store_true", help="also a loaded run with --no-adapt-threads")
    parser.add_argument("--out", default="demo_load", help="results/<out>.json and .md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptlab-demo-") as scratch:
        work = Path(scratch)  # the corpus prepared once, untimed, as a second `make demo` finds it
        subprocess.run([sys.executable, "-c", "from gptlab.train.setup import default_data; default_data()"],
                       cwd=work, check=True, capture_output=True)
        assert (work / DEFAULT_DATA_DIR / "meta.json").is_file()
        variants = [(0, []), (args.spinners, [])] + ([(args.spinners, ["--no-adapt-threads"])] if args.without_adapt else [])
        rows = [run_demo(work, spinners, extra) for spinners, extra in variants]
    save_results(args.out, {"machine": MACHINE, "runs": rows}, table(rows))


if __name__ == "__main__":
    main()
