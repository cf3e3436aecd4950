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
