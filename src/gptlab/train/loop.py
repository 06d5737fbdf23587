"""The loop: it steps, evaluates and checkpoints a run that `setup` made, and nothing else.

One loop serves one process and many. Each step draws one global batch of `batch_size * grad_accum`
windows from the run's seeded generator; under torchrun every process draws the same offsets and
reads only its own share of the windows, its micro-batches, and DDP averages the gradients.
`grad_accum` counts the micro-batches of the whole step, so the number of processes changes the
speed, not the arithmetic: 2 processes compute what 1 process with the same `--grad-accum` computes.

SIGINT and SIGTERM end the run after the step in progress, with a checkpoint, and `--resume`
continues it with the same losses, bit for bit on a CPU, as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import save_model
from ..device import DTYPES
from ..errors import EnvironmentProblem, GptlabError, first_line
from ..evaluate.scorer import token_nll
from ..inference.modes import eval_mode
from ..model import GPT
from ..throughput import ThroughputMeter, matmul_peak
from . import distributed
from .callbacks import Callback, Metering, Step, StepLog, ThreadTuning
from .config import TrainConfig
from .device import autocast_context
from .distributed import Group
from .eval_tasks import task_scores, tasks_due
from .labeled_data import LabeledDataset
from .metrics import MetricsLog
from .optim import learning_rate, schedule_position
from .progress import CpuWait
from .run_dir import BEST_DIR, METRICS_FILE
from .setup import Dataset, Run
from .state import process_rng_state, save_checkpoint


class StopSignals:
    """SIGINT and SIGTERM set a flag the loop reads between steps, instead of raising mid-step.

    The step in progress finishes, a checkpoint is written and `train` returns. Further signals are
    ignored meanwhile (torchrun passes a terminal's Ctrl-C on, so a worker sees it twice); SIGKILL
    still ends the process at once, and the atomic checkpoint writes survive that.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received = self.received or signal.Signals(signum).name


@torch.no_grad()
def estimate_loss(
    model: GPT, dataset: Dataset, config: TrainConfig, device: torch.device, step: int, group: Group = Group(),
) -> dict[str, float]:
    """Mean loss over `eval_iters` random batches per split, drawn from an RNG of their own.

    The batches depend on the seed and the step only, so evaluating never moves the training
    generator and gives the same figures however many processes share the work.
    """
    losses = {}
    with eval_mode(model):
        for split in ("train", "val"):
            rng = np.random.default_rng([config.seed, step, split == "val"])
            total = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(config.eval_iters):
                x, y = dataset.get_batch(split, config.batch_size, config.block_size, rng)
                if i % group.world_size == group.rank:
                    x, y = x.to(device), y.to(device)
                    with autocast_context(device, config.dtype):  # the positions the loss takes (not the adder's prompt)
                        total += token_nll(model, x, y, where=y >= 0).double().mean()
            losses[split] = distributed.all_reduce_sum(total, group).item() / config.eval_iters
    return losses


@torch.no_grad()
def estimate_task(
    model: GPT, dataset: LabeledDataset, config: TrainConfig, device: torch.device, step: int, group: Group = Group(),
) -> dict[str, float]:
    """A task head's loss (the task's cross-entropy, without the auxiliary LM loss) and accuracy: on the
    whole validation split, each example once, and on `eval_iters` random training batches drawn as
    estimate_loss draws them. The batches are shared among the processes and the sums added up."""
    out = {}
    with eval_mode(model):
        for split in ("train", "val"):
            if split == "val":
                batches = dataset.ordered_batches("val", config.batch_size)
            else:
                rng = np.random.default_rng([config.seed, step, 0])
                batches = (dataset.get_batch("train", config.batch_size, config.block_size, rng)
                           for _ in range(config.eval_iters))
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss summed over examples, correct, count
            for i, batch in enumerate(batches):
                if i % group.world_size != group.rank:
                    continue
                *inputs, labels = (t.to(device) for t in batch)
                with autocast_context(device, config.dtype):
                    logits = model(*inputs).logits.float()  # (B, num_labels) or (B, num_choices)
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
                correct = (logits.argmax(-1) == labels).sum()
                sums += torch.stack([loss.double(), correct.double(), torch.tensor(len(labels), dtype=torch.float64,
                                                                                   device=device)])
            loss_sum, correct, count = distributed.all_reduce_sum(sums, group).tolist()
            out[split], out[f"{split}_accuracy"] = loss_sum / count, correct / count
    return out


class Loop:
    """Steps, evaluates and checkpoints `run` until its budget (steps or seconds) or a signal ends it."""

    def __init__(self, run: Run, show_progress: bool) -> None:
        self.run, self.state, self.config = run, run.state, run.config
        self.show = show_progress and run.group.is_main
        self.metrics = MetricsLog(run.run_dir / METRICS_FILE if run.group.is_main else None)
        self.losses = {"train": math.nan, "val": math.nan}
        self.saved_step = self.state.step if run.resumed else -1  # the last checkpoint's step
        self.session_steps = 0
        self.elapsed_before = self.state.elapsed  # the earlier sessions' seconds of training
        self.session_start = time.perf_counter()
        self.clock = self.elapsed_before  # the run's seconds so far, the same number in every process
        meter = ThroughputMeter(self._peak_flops(), warn=self._warn_on_main)
        self.cpu_wait = CpuWait()  # how long the threads waited for a core: was the machine busy?
        adapt = self.config.adapt_threads and run.device.type == "cpu"
        self.callbacks: list[Callback] = [ThreadTuning(adapt, self._warn_on_main), Metering(meter), StepLog(meter)]
        self.fitting = False  # between the callbacks' fit_begin and fit_end

    def fit(self) -> str:
        """Train to the end of the budget; returns the signal that stopped the run early ("" if none)."""
        config, state = self.config, self.state
        self.session_start = time.perf_counter()
        stopped_by = ""
        self._trigger("fit_begin")
        self.fitting = True
        try:
            with StopSignals() as signals:
                while state.step < config.max_iters and not stopped_by:
                    if self._evaluation_due():
                        self.checkpoint(self.validate())
                    stopped_by = self.train_step(signals)
                if stopped_by in ("SIGINT", "SIGTERM"):
                    self.checkpoint(None)
                    return stopped_by
                self._end_fit()  # the progress bar closes before the final words
                if self.show:
                    print(f"final evaluation and checkpoint at step {state.step:,}", file=sys.stderr)
                self.checkpoint(self.validate())
                return ""
        finally:
            self._end_fit()
            self.metrics.close()

    def _trigger(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def _end_fit(self) -> None:
        if self.fitting:
            self.fitting = False
            self._trigger("fit_end")

    def _evaluation_due(self) -> bool:
        """Every eval_interval steps, once: a run resumed from an evaluated step does not repeat it."""
        interval = self.config.eval_interval
        return bool(interval) and self.state.step % interval == 0 and self.state.step > self.state.last_eval_step

    # --- one step ---------------------------------------------------------------------------

    def train_step(self, signals: StopSignals) -> str:
        """One optimizer step; returns why the run must stop now ("" to go on)."""
        self._trigger("step_begin")
        lr = self._set_learning_rate()
        micro_batches = self._micro_batches()
        loss_sum = self._accumulate_gradients(micro_batches)
        # the input positions computed (padding included): a window's block_size, a task batch's widest row
        local_tokens = sum(batch[0].numel() for batch in micro_batches)
        loss, stop, tokens = self._agree(loss_sum, signals, local_tokens)
        grad_norm = self._clip_gradients(loss)
        skipped = self._nonfinite(loss, grad_norm)
        self._update(skipped)
        self._advance(tokens)
        self._trigger("step_end", Step(self.state.step, loss, lr, grad_norm, tokens, skipped))
        self.session_steps += 1
        return stop

    def _set_learning_rate(self) -> float:
        """The schedule's rate for this step, on the clock as agreed at the end of the previous step."""
        config, state = self.config, self.state
        lr = learning_rate(schedule_position(state.step, self.clock, state.schedule_start, config), config)
        for param_group in state.optimizer.param_groups:
            param_group["lr"] = lr
        return lr

    def _micro_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """This process's micro-batches of the step's global batch: the model's arguments, (x, y) for a
        language model, (ids, [extract positions,] labels) for a task head."""
        config, run = self.config, self.run
        rows = distributed.rows_of(run.group, run.micro_steps * config.batch_size)
        # every process draws the whole step's offsets (the generators stay in step) and reads its rows
        batch = run.dataset.get_batch("train", config.batch_size * config.grad_accum, config.block_size,
                                      self.state.data_rng, rows=rows, pin_memory=run.device.type == "cuda")
        return list(zip(*(t.split(config.batch_size) for t in batch)))

    def _accumulate_gradients(self, micro_batches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Forward and backward over each micro-batch; returns this process's share of the step's loss."""
        run, device = self.run, self.run.device
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            with self._gradient_sync(last=i == len(micro_batches) - 1):
                with autocast_context(device, self.config.dtype):
                    loss = self._forward(batch) / run.micro_steps
                self.state.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def _agree(self, loss_sum: torch.Tensor, signals: StopSignals, local_tokens: int) -> tuple[float, str, int]:
        """One exchange per step: the global loss, whether any process was signalled, the clock and the
        step's tokens, so that every process takes the same decisions (stop, learning rate) at the same
        step. Returns the loss, why the run must stop ("" to go on) and the tokens of all processes."""
        group, device = self.run.group, self.run.device
        local = [signals.received == "SIGINT", signals.received == "SIGTERM", self.elapsed(), local_tokens]
        report = torch.cat([loss_sum.double().reshape(1), torch.tensor(local, dtype=torch.float64, device=device)])
        loss, sigint, sigterm, clock, tokens = distributed.all_reduce_sum(report, group).tolist()
        self.clock = clock / group.world_size
        if sigint or sigterm:
            return loss / group.world_size, "SIGINT" if sigint else "SIGTERM", int(tokens)
        time_up = bool(self.config.max_time) and self.clock >= self.config.max_time
        return loss / group.world_size, "max_time" if time_up else "", int(tokens)

    def _clip_gradients(self, loss: float) -> float | None:
        """The gradient norm before clipping to grad_clip; None when not clipped (no clip, or a lost step)."""
        state = self.state
        if not (math.isfinite(loss) and self.config.grad_clip > 0):
            return None
        state.scaler.unscale_(state.optimizer)
        return torch.nn.utils.clip_grad_norm_(state.model.parameters(), self.config.grad_clip).item()

    def _update(self, skipped: str) -> None:
        """The optimizer's step, unless the step is skipped; the gradients are cleared either way."""
        state = self.state
        if not skipped:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)

    def _advance(self, tokens: int) -> None:
        """Count the step and its tokens (the step's, all processes); the schedule's clock starts as the
        first step ends."""
        state = self.state
        state.step += 1
        state.tokens_seen += tokens
        if state.schedule_start is None:
            state.schedule_start = self.clock

    def _forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not self.config.compile or self.session_steps > 0:
            return self.run.step_model(*batch).loss
        try:  # the first call compiles: turn a toolchain failure into one clear line
            return self.run.step_model(*batch).loss
        except torch._dynamo.exc.TorchDynamoException as exc:
            raise GptlabError(f"--compile: torch.compile failed ({first_line(exc)}); train without --compile") from None

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on a step's last micro-batch only; the others just accumulate."""
        if isinstance(self.run.step_model, DistributedDataParallel) and not last:
            return self.run.step_model.no_sync()
        return contextlib.nullcontext()

    def _nonfinite(self, loss: float, grad_norm: float | None) -> str:
        """"" for a healthy step; otherwise what went wrong, after stopping the run if so configured.

        The optimizer has not stepped yet, so the weights are still those of the last good step. With
        float16 an infinite gradient is the scaler's business (it skips the step and lowers the scale).
        """
        if not math.isfinite(loss):
            what = f"the training loss is {loss}"
        elif grad_norm is not None and not math.isfinite(grad_norm) and not self.state.scaler.is_enabled():
            what = f"the gradient norm is {grad_norm}"
        else:
            return ""
        if self.config.on_nonfinite == "skip":
            return what
        self._raise_nonfinite(f"{what} at step {self.state.step + 1}")
        return what  # unreachable: _raise_nonfinite raises

    def _raise_nonfinite(self, what: str) -> None:
        if self.saved_step >= 0:
            kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.run.run_dir}; continue it "
                    f"with --resume (perhaps with a lower --lr)")
        else:
            kept = "no checkpoint had been written yet"
        raise GptlabError(f"{what}; training stopped and {kept}, or pass --on-nonfinite skip to skip such steps")

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier sessions included: --max-time budgets the whole run."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    # --- evaluation, checkpoints, logs ------------------------------------------------------

    def validate(self) -> dict[str, float]:
        run, state = self.run, self.state
        estimate = estimate_task if isinstance(run.dataset, LabeledDataset) else estimate_loss
        self.losses = estimate(state.model, run.dataset, self.config, run.device, state.step, run.group)
        state.last_eval_step = state.step
        row = {"step": state.step, "val_loss": self.losses["val"], "train_eval_loss": self.losses["train"]}
        if "val_accuracy" in self.losses:
            row |= {"val_accuracy": self.losses["val_accuracy"], "train_eval_accuracy": self.losses["train_accuracy"]}
        self.metrics.write(row)
        if run.group.is_main and tasks_due(self.config, state.step):
            self.metrics.write({"step": state.step, "task_scores": task_scores(state.model, run.tokenizer, self.config, run.device)})
        if not math.isfinite(self.losses["val"]):
            self._raise_nonfinite(f"the validation loss is {self.losses['val']} at step {state.step}")
        return self.losses

    def checkpoint(self, losses: dict[str, float] | None) -> None:
        """Write the run directory; every process takes part, because each has its own random state."""
        run, state = self.run, self.state
        rng_states = distributed.gather_to_all(process_rng_state(), run.group)
        improved = losses is not None and losses["val"] < state.best_val_loss
        if improved:
            state.best_val_loss = losses["val"]
        state.elapsed = self.elapsed()
        if run.group.is_main:
            kept = self.saved_step
            try:
                if improved:
                    save_model(state.model, run.run_dir / BEST_DIR)
                    run.tokenizer.save(run.run_dir / BEST_DIR)
                save_checkpoint(run.run_dir, state.checkpoint(rng_states))
                kept = state.step
                save_model(state.model, run.run_dir)
            except EnvironmentProblem as exc:
                where = (f"--resume continues from the checkpoint of step {kept} once that is mended" if kept >= 0
                         else "no checkpoint had been written yet")
                raise EnvironmentProblem(f"{exc} (saving step {state.step}); {where}") from None
        # no process leaves before rank 0 has written: torchrun stops every worker once one has exited
        distributed.barrier(run.group)
        self.saved_step = state.step

    def _warn_on_main(self, message: str) -> None:
        if self.run.group.is_main:
            tqdm.write(message, file=sys.stderr)

    def _peak_flops(self) -> float:
        """The matmul peak of all processes together, each probed while the others probe too."""
        run = self.run
        distributed.barrier(run.group)
        rows = self.config.batch_size * self.config.block_size  # one micro-batch
        peak = matmul_peak(run.device, DTYPES[self.config.dtype], config=self.state.model.config, rows=rows)
        total = distributed.all_reduce_sum(torch.tensor([peak], dtype=torch.float64, device=run.device),
                                           run.group).item()
        if self.show:
            print(f"matmul peak ({self.config.dtype}, {run.group.world_size} process(es)): {total / 1e9:,.1f} GFLOP/s")
        return total
