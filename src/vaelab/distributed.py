"""DistributedDataParallel plumbing: which process this is, the few collective calls the
training loop needs, stopping on Ctrl-C/SIGTERM (the flag and the ranks' agreement), and the
torchrun relaunch. Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK set) each process is one
rank; otherwise there is one rank and every collective here is a no-op.

``python -m vaelab.train`` with ``train.nproc: N > 1`` starts itself again under
``torch.distributed.run --standalone --nproc_per_node N`` (one machine); for several machines run
``torchrun`` yourself with the same command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


def launch_command(nproc: int, argv: list[str], max_restarts: int = 0) -> list[str]:
    """This train command again, under torchrun on this machine with ``nproc`` processes, which
    torchrun starts again up to ``max_restarts`` times when one of them fails."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "vaelab.train",
        *argv,
    ]


def thread_share(local_size: int) -> int:
    """Each of ``local_size`` processes' share of the cores this process may run on (its CPU
    affinity where the OS tells it), at least 1: the ranks of one machine share its cores, and
    more threads than cores only slow them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // local_size)


def launch_environment(nproc: int) -> dict[str, str]:
    """The environment `launch` hands torchrun: this one, a rendezvous store per attempt
    (``RESTARTABLE``), and ``OMP_NUM_THREADS`` = each process's share of the cores unless the
    user set it.

    Why the variable: torchrun sets OMP_NUM_THREADS=1 in its own environment, which every worker
    inherits, when ``--nproc_per_node`` > 1 and the variable is unset (torch 2.14.1,
    torch/distributed/run.py, ``config_from_args``, line 980), so `start`, which shares the
    cores out only when it is unset, never did: on 16 cores ``train.nproc: 2`` trained on 2. A
    value torchrun finds it keeps; torch reads it at start-up as its intra-op thread count
    (capped by MKL at the physical cores)."""
    env = os.environ | RESTARTABLE
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(thread_share(nproc))
    return env


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
        # Under `launch` the variable is always set (launch_environment); this shares the cores
        # out under a torchrun started by hand with one process a machine, or without torchrun.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(thread_share(world.local_size))
    if world.size > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return device


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every rank is here (under DDP; nothing in a single process)."""
    if world.size > 1:
        dist.barrier()


def gather(value: object, world: World) -> list[object]:
    """Every rank's ``value`` (a small picklable object), in rank order, on every rank."""
    if world.size == 1:
        return [value]
    values: list[object] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else itself."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def all_true(flag: bool, world: World, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (a MIN all-reduce on ``device``)."""
    return bool(all_reduce(torch.tensor(int(flag), device=device), world, op="min"))


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
        self._pending = dist.all_reduce(
            self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True
        )
        return False

    def close(self) -> None:
        """Wait for the last reduction, if one is under way (every rank started it). A peer that
        failed makes the wait fail too; that error adds nothing to the one being raised."""
        if self._pending is not None:
            with contextlib.suppress(RuntimeError):
                self._pending.wait()
            self._pending = None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """A signal handler that only records the request, for the loop to read between two steps:
    an exception raised at an arbitrary point could land inside MLflow's or SQLite's code and be
    swallowed there.

    In a single process a second signal stops at once (the default actions return after the
    first). A DDP rank keeps recording: torchrun sends a rank more than one signal (the forwarded
    Ctrl-C, then SIGTERM when a peer has exited; a terminal's Ctrl-C reaches ranks of a torchrun
    started by hand directly too), and rank 0 must still mark its run KILLED; torchrun's own
    SIGKILL after 30 s ends a rank that hangs."""

    def __init__(self, repeat_stops_at_once: bool = True) -> None:
        self.signal: int | None = None
        self.repeat_stops_at_once = repeat_stops_at_once

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Handle SIGINT and SIGTERM with this flag inside the block; the handlers that were
        there before are back afterwards (``main`` also runs inside pytest and notebooks)."""
        previous = {signum: signal.signal(signum, self.request) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def request(self, signum: int, frame: object) -> None:
        self.signal = self.signal or signum
        if self.repeat_stops_at_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def is_set(self) -> bool:
        return self.signal is not None


# torchrun shares its rendezvous store with the processes' process group by default, and a
# restarted group may then read the last attempt's addresses and fail to connect ("Gloo
# connectFullMesh failed ... Connection refused", seen here; pytorch/pytorch#135712). With this
# set, each attempt gets a store of its own.
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def unrestartable_warning() -> str | None:
    """A warning when torchrun (started by hand) would restart the processes but shares its
    store with them (``RESTARTABLE`` unset): the restart would likely fail to connect."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        ((name, value),) = RESTARTABLE.items()
        return (
            f"warning: torchrun may restart these processes {restarts} times, but without "
            f"{name}={value} in its environment a restarted group may fail to connect "
            "(pytorch/pytorch#135712); set it where torchrun starts (docs/scale.md)."
        )
    return None


def restart_count() -> int:
    """How often this machine's torchrun has restarted its processes (0: the first start, or no
    torchrun). On several machines see ``group_restart_count``."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def group_restart_count(world: World) -> int:
    """How often torchrun has restarted the processes of all machines: the largest count of any
    rank (one collective call under DDP).

    Why not this rank's own: each machine's torchrun counts only the failures of its own
    processes. When a process on another machine fails, that machine's torchrun restarts and
    waits for a new rendezvous, and this machine's torchrun, whose processes still look
    healthy, restarts them for the new round without counting it ("membership changes do not
    count as retries", torch 2.14.1, torch/distributed/elastic/agent/server/api.py,
    ``_invoke_run``). Seen here with two torchrun nodes and node 1's process killed: rank 0 came
    back with TORCHELASTIC_RESTART_COUNT=0, rank 1 with 1."""
    return max(int(count) for count in gather(restart_count(), world))


class NotRestarted(VaelabError):
    """A restarted group that found a final failure's message: it stops before training."""


class FinalStop:
    """A failure torchrun must not restart: a divergence, a refusal, a Ctrl-C or SIGTERM the
    ranks agreed on (``VaelabError``, ``KeyboardInterrupt``). torchrun restarts a failed worker
    group whatever the reason, so rank 0 leaves the failure's message in ``path`` (beside the
    checkpoint); a restarted group finds it as soon as its ranks have joined and stops with it,
    instead of training again. A first start removes an old one. A lost process (killed, out
    of memory, a node gone) fails the others' collective calls with a ``RuntimeError``: that is
    what restarts are for. In a single process it does nothing."""

    def __init__(self, path: Path, world: World) -> None:
        self.path = path
        self.world = world

    def check(self) -> int:
        """Stop a restarted group after a final failure; forget an old one on a first start.
        Returns the group's restart count (``group_restart_count``, a collective call once the
        ranks have joined): the same on every rank, so all ranks stop or none does; with each
        machine's own count a rank whose torchrun did not count the restart went on training
        alone (and removed the file)."""
        restarts = group_restart_count(self.world)
        if self.world.size == 1:
            return restarts
        if restarts == 0:
            if self.world.is_main:
                self.path.unlink(missing_ok=True)
        elif self.path.exists():
            raise NotRestarted(f"not restarted after a final failure: {self.path.read_text()}")
        return restarts

    @contextlib.contextmanager
    def recorded(self) -> Iterator[None]:
        """Record a final failure raised inside the block (rank 0; DDP only); ``check``'s own
        stop leaves the first failure's message as it is."""
        try:
            yield
        except NotRestarted:
            raise
        except (VaelabError, KeyboardInterrupt) as error:
            if self.world.size > 1 and self.world.is_main:
                reason = str(error) or "interrupted (Ctrl-C or SIGTERM)"
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(reason)
            raise


def launch(nproc: int, argv: list[str], max_restarts: int = 0) -> None:
    """Run this train command again as ``nproc`` DDP processes under torchrun and wait, each
    with its share of the cores (``launch_environment``); Ctrl-C and SIGTERM are passed on
    (torchrun passes them to every rank, and does not restart after them). torchrun restarts the
    processes up to ``max_restarts`` times when one fails."""
    command = launch_command(nproc, argv, max_restarts)
    print(f"train: {nproc} processes: {' '.join(command[1:])}", flush=True)
    # Its own session: a terminal's Ctrl-C reaches torchrun once, through the forward below.
    env = launch_environment(nproc)
    launcher = subprocess.Popen(command, start_new_session=True, env=env)
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        launcher.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        code = launcher.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if forwarded and code == 0:  # it came as the last epoch ended: nothing was lost
        raise VaelabError(
            f"interrupted ({signal.Signals(forwarded[0]).name}) after training had finished: "
            "the model and history are written and the MLflow run waits for `record`."
        )
    if forwarded:  # the ranks agreed on the stop (StopAgreement); rank 0 recorded the run
        raise VaelabError(
            f"interrupted ({signal.Signals(forwarded[0]).name}): the training processes stopped; "
            "rank 0's message above says what became of the MLflow run. Run `dvc repro` (or "
            "this command) again to resume from the last complete epoch."
        )
    if code != 0:
        raise VaelabError(
            f"the {nproc} training processes failed (torchrun exit code {code}); "
            "their messages are above."
        )
