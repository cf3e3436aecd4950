"""DistributedDataParallel plumbing: which process this is, and the few collective calls the
training loop needs. Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK set) each process is one
rank; otherwise there is one rank and every call here is a no-op.

``python -m vaelab.train`` with ``train.nproc: N > 1`` starts itself again under
``torch.distributed.run --standalone --nproc_per_node N`` (one machine); for several machines run
``torchrun`` yourself with the same command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vaelab.errors import VaelabError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the model, history, checkpoints and MLflow."""
        return self.rank == 0


SINGLE_PROCESS = World()


def from_env() -> World:
    """The world torchrun describes in the environment, or a single process."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE_PROCESS
    return World(
        rank=int(os.environ["RANK"]),
        size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """This train command again, under torchrun on this machine with ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "vaelab.train", *argv]  # fmt: skip


def start(world: World, device_type: str) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU) and return this rank's device."""
    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise VaelabError(
                f"rank {world.rank} needs GPU {world.local_rank}, but this machine has "
                f"{torch.cuda.device_count()}; start at most one process per GPU (train.nproc)."
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # The ranks of one machine share its cores; more threads than cores only slows them.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)  # fmt: skip
            torch.set_num_threads(max(1, cores // world.local_size))
    if world.size > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return device


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """Sum (or min) ``tensor`` over all ranks, in place; returns it."""
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return tensor


class StopAgreement:
    """Ranks stop together: called before every step, returns True on every rank at the same
    step once any rank's ``requested()`` said so (a Ctrl-C/SIGTERM flag).

    Why: a rank that stops on its own leaves its peers blocked in the step's gradient
    all-reduce, which then fails with a gloo/NCCL "connection closed" error instead of an
    interruption, and the MLflow run would read FAILED. Each call starts an asynchronous MAX
    all-reduce of this rank's flag and returns the result of the previous call's, so agreeing
    costs no wait per step (the reduction runs during the step) and the stop comes one step after
    the request. The flag lives on the CPU in a gloo group, also under NCCL: no device sync.
    In a single process it is ``requested()`` itself.
    """

    def __init__(self, requested: Callable[[], bool], world: World) -> None:
        self.requested = requested
        self.world = world
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._pending: dist.Work | None = None
        self._group = None
        if world.size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # every rank calls this, in order

    def __call__(self) -> bool:
        if self.world.size == 1:
            return self.requested()
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            if self._flag.item():
                return True  # every rank read the same value: none starts another reduction
        self._flag = torch.tensor([int(self.requested())], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group,
                                        async_op=True)  # fmt: skip
        return False

    def close(self) -> None:
        """Wait for the last reduction (training ended without a stop)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
