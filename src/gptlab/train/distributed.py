"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, DDP syncs gradients.

`torchrun --nproc_per_node=N -m gptlab train ...` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
in each process's environment; `setup` reads them and joins the process group (gloo on a CPU, NCCL on
CUDA). Without them training runs as a group of one, and every helper here is a no-op, so the
training loop has a single code path.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress and writes the run directory."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 under it; usable before (and after) `setup`."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> Group:
    """Join the process group torchrun describes, or return the group of one."""
    if not launched_by_torchrun():
        return Group()
    group = Group(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    if not group.active:
        return group
    if device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return group


def process_device(device: torch.device, group: Group) -> torch.device:
    """Each process on a multi-GPU node drives the GPU of its local rank."""
    if device.type == "cuda" and group.active:
        return torch.device("cuda", group.local_rank)
    return device


def teardown(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """The element-wise sum over all processes, in place (the tensor itself when alone)."""
    if group.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(value: Any, group: Group) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not group.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(value: Any, group: Group) -> list[Any]:
    """Every rank's `value`, indexed by rank, on every rank."""
    if not group.active:
        return [value]
    values: list[Any] = [None] * group.world_size
    dist.all_gather_object(values, value)
    return values


def rows_of(group: Group, rows_per_process: int) -> slice:
    """This process's rows of a global batch of world_size * rows_per_process rows: rank r reads the
    contiguous block r * rows_per_process ... (r + 1) * rows_per_process - 1, its micro-batches in turn.
    Alone, a process reads every row in order, so a step's arithmetic is the same whatever the number
    of processes."""
    return slice(group.rank * rows_per_process, (group.rank + 1) * rows_per_process)


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


def launch(nproc: int, argv: list[str], grace_seconds: int = 120) -> int:
    """Run `gptlab argv` in `nproc` processes on this machine, as `torchrun --standalone` would.

    This process becomes the elastic agent that torchrun itself runs: it starts the workers, waits,
    and passes SIGINT/SIGTERM on to them, then gives them `grace_seconds` to write their checkpoint.
    It returns an exit status instead of torchrun's traceback: the workers have already said what
    happened on stderr.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # like torchrun: the processes share the cores instead of each starting a thread per core
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, shutdown_timeout=grace_seconds,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "gptlab", *argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        code = next(iter(exc.failures.values())).exitcode
        return 128 - code if code < 0 else code or 1  # a negative exit code is a signal's number
    return 0
