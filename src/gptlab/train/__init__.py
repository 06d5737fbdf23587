"""Training: fast on one CPU, data-parallel under torchrun, resumable exactly. `train` reads as litgpt's
pretrain does: set up (setup.py), fit (loop.py), then finish (the loss plot and report.md).

A run directory holds the model as a Hugging Face checkpoint (`config.json`, `model.safetensors`),
the tokenizer, `train_config.json` (the options of its latest session), `training_state.pt` (the
checkpoint: everything `--resume` needs, model included; see state.py), `metrics.jsonl`, `loss.png`,
`report.md`/`report.json`, and `best/` (the model with the lowest validation loss so far).

    config.py     TrainConfig (frozen), its checks and help lines, the presets
    setup.py      every check, then the run directory, the model, the optimizer, the restored state
    state.py      TrainState: the checkpoint, saved and restored from one definition
    loop.py       steps, evaluates, checkpoints
    run_dir.py    what may be replaced, the lock, the auto-numbered default
    device.py     dtype, autocast, TF32, torch.compile, memory (the device itself: gptlab.device)
    run.py        train(): setup, fit, finish
    report.py     report.md/report.json: the run against n-gram baselines (or the adder's exact match)
    adder.py      the adder task: two-digit addition, its data set and its grading
    labeled_data.py  --task classify / choice: labelled examples as the task head's batches
    eval_tasks.py --eval-tasks: lm-eval scores logged at evaluations
    optim.py, distributed.py, metrics.py, progress.py (the bar, the busy-CPU warning)
"""

from __future__ import annotations

from ..lazy import lazy_attributes

_EXPORTS = {
    "TRAIN_PRESETS": ".config", "TrainConfig": ".config", "build_train_config": ".config",
    "saved_options": ".setup", "TrainResult": ".run", "train": ".run",
}
__all__ = sorted(_EXPORTS)
# the command line reads TrainConfig for every command's parser: that must not import torch
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
