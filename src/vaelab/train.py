"""Stage ``train``: fit the VAE, log every epoch to MLflow, write the model and the history.

    python -m vaelab.train --params params.yaml --data-dir data/MNIST --model models/vae.pt \
        --history reports/train_history.csv --run-info models/mlflow_run.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from vaelab import distributed, tracking
from vaelab import params as params_mod
from vaelab.data import (
    CHECKSUMS_FILE,
    atomic_write_bytes,
    evaluation_images,
    load_split,
    md5_of,
    training_images,
)
from vaelab.errors import VaelabError, run_stage
from vaelab.model import VAE, dataset_elbo, elbo_terms, images_to_float, save, training_loss
from vaelab.params import Params

# Columns of reports/train_history.csv; also the MLflow metric keys (step = epoch).
HISTORY_COLUMNS = (
    "epoch", "train/loss", "train/neg_elbo", "train/recon", "train/kl",
    "test/neg_elbo", "test/recon", "test/kl", "epoch_seconds", "images_per_second",
    "train/images",
)  # fmt: skip


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise VaelabError(
            "params.yaml: 'train.device' is 'cuda' but this machine has no usable CUDA device "
            f"(torch {torch.__version__}). Set train.device to 'auto' or 'cpu'."
        )
    return torch.device(requested)


def adam(model: VAE, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one kernel for all parameters; CPU and CUDA): measured on a
    2-core CPU, an epoch took 2.3-2.7 s with it against 4.3-4.6 s for the default (see README)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def make_train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, likelihood: str, compile: bool
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimisation step on a batch x (B, 1, 28, 28) with reparameterisation noise eps
    (B, latent), KL weight ``kl_weight`` and ``divisor`` (0-dim tensors on the device, so
    annealing never recompiles); returns the batch sums of (loss, recon, kl) as a (3,) tensor on
    the device, so the caller never syncs with the host.

    The loss is the batch's sum of per-image losses over ``divisor``. On one process the divisor
    is B: the batch mean. Under DDP, which averages the ranks' gradients, it is
    B_global / world, so that average is the gradient of the global batch's mean, also when
    the last batch splits unevenly or leaves a rank an empty slice.

    compile=True wraps it in ``torch.compile``: on CUDA in "reduce-overhead" mode (CUDA graphs,
    no kernel launch overhead per step), elsewhere in the default mode.
    """

    def step(
        x: torch.Tensor, eps: torch.Tensor, kl_weight: torch.Tensor, divisor: torch.Tensor
    ) -> torch.Tensor:
        logits, mu, logvar = model(x, eps=eps)
        terms = elbo_terms(x, logits, mu, logvar, likelihood)
        loss = training_loss(terms, kl_weight, divisor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach() * divisor, terms.recon.detach().sum(),
                            terms.kl.detach().sum()])  # fmt: skip

    if not compile:
        return step
    on_cuda = next(model.parameters()).is_cuda
    # dynamic=False: two static shapes (full batches and the last, smaller one) compile once each.
    compiled = torch.compile(step, mode="reduce-overhead" if on_cuda else None, dynamic=False)
    if not on_cuda:
        return compiled

    def graphed_step(
        x: torch.Tensor, eps: torch.Tensor, kl_weight: torch.Tensor, divisor: torch.Tensor
    ) -> torch.Tensor:
        # Each call is a new iteration: CUDA graphs may reuse the previous output's memory (the
        # caller has already added it to its sums).
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, eps, kl_weight, divisor)

    return graphed_step


def kl_weights(
    beta: float, warmup_epochs: int, epoch: int, n_batches: int, device: torch.device
) -> torch.Tensor:
    """The KL weight of every step of ``epoch`` (1-based), (n_batches,): beta, or with warm-up
    beta * min(1, steps done / steps of warm-up), rising linearly step by step."""
    if warmup_epochs == 0:
        return torch.full((n_batches,), beta, device=device)
    steps = torch.arange(1, n_batches + 1, device=device, dtype=torch.float32)
    progress = (epoch - 1 + steps / n_batches) / warmup_epochs
    return beta * progress.clamp(max=1.0)


def check_batch_size(batch_size: int, n_images: int) -> None:
    if batch_size > n_images:
        raise VaelabError(
            f"params.yaml: 'train.batch_size' is {batch_size}, larger than the training set "
            f"({n_images} images). Choose a batch size <= {n_images}."
        )


def train_model(
    params: Params,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] = lambda row: None,
    resume: dict | None = None,
    on_state: Callable[[dict], None] = lambda state: None,
    stop_requested: Callable[[], bool] = lambda: False,
    world: distributed.World = distributed.SINGLE_PROCESS,
) -> tuple[VAE, list[dict[str, float]]]:
    """Train on uint8 images (N, 28, 28); return the model and one history row per epoch.

    The whole data set stays on ``device`` as uint8; each batch is an index slice of a seeded
    permutation. Seeded runs on the CPU are bit-identical.

    After each epoch ``on_state`` gets the training state (model, optimizer, history, every RNG
    state) and then ``on_epoch`` the history row. Passing such a state as ``resume`` continues
    after its epoch exactly as the uninterrupted run would have. ``stop_requested`` is polled
    before every step; when it says so, training raises KeyboardInterrupt between two steps
    (under DDP on every rank at the same step: ``distributed.StopAgreement``).

    Under DDP (``world.size`` > 1) every rank draws the same permutation, binarisation and noise
    for the whole global batch (``train.batch_size``) and trains on its slice of it, so the maths
    is the single-process run's up to the order of float reductions. Epoch sums are all-reduced;
    only rank 0 evaluates the test set and calls ``on_state``/``on_epoch``.
    """
    cfg = params.train
    n_images = len(train_images)
    check_batch_size(cfg.batch_size, n_images)
    torch.manual_seed(cfg.seed)  # initial weights and the reparameterisation noise
    order = torch.Generator(device=device).manual_seed(cfg.seed)  # batch order, its own stream
    # ModelParams' fields are VAE's constructor arguments.
    model = VAE(**dataclasses.asdict(params.model)).to(device)
    optimizer = adam(model, cfg.lr)
    trained = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                          else None)  # fmt: skip
    train_step = make_train_step(trained, optimizer, params.loss.likelihood, cfg.compile)
    should_stop = distributed.StopAgreement(stop_requested, world)  # ranks stop at one step
    binarize = params.data.binarize
    train_images = training_images(train_images, binarize).to(device)
    test_images = evaluation_images(test_images, binarize, "test").to(device)
    n_batches = math.ceil(n_images / cfg.batch_size)
    # Loss divisors (see make_train_step): full batches, and the last one, which may be smaller.
    last_size = n_images - (n_batches - 1) * cfg.batch_size
    full_divisor = torch.tensor(cfg.batch_size / world.size, device=device)
    last_divisor = torch.tensor(last_size / world.size, device=device)
    history: list[dict[str, float]] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history = list(resume["history"])
        torch.set_rng_state(resume["rng_cpu"])
        order.set_state(resume["rng_order"])
        if device.type == "cuda" and resume.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(resume["rng_cuda"], device)

    for epoch in range(len(history) + 1, cfg.epochs + 1):
        model.train()
        started = time.perf_counter()
        permutation = torch.randperm(n_images, generator=order, device=device)
        # Sums over images of (loss, recon, kl), kept on the device: no host sync per step.
        sums = torch.zeros(3, device=device)
        local_images = 0  # images this rank trained on (all ranks together: the data set)
        # The first step whose loss was not finite (-1: none), also tracked on the device.
        first_bad_step = torch.tensor(-1, device=device)
        weights = kl_weights(params.loss.beta, cfg.kl_warmup_epochs, epoch, n_batches, device)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=None, unit="batch")  # fmt: skip
        for step in bar:
            if should_stop():
                raise KeyboardInterrupt
            index = permutation[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = images_to_float(train_images[index])  # (B, 1, 28, 28) in [0, 1]
            if binarize == "dynamic":
                x = torch.bernoulli(x)  # a fresh binary sample each time an image is seen
            eps = torch.randn((len(x), model.latent_dims), device=device)  # (B, latent)
            if world.size > 1:  # this rank's slice of the global batch (maybe empty)
                x = x.tensor_split(world.size)[world.rank]
                eps = eps.tensor_split(world.size)[world.rank]
            divisor = full_divisor if step < n_batches - 1 else last_divisor
            batch_sums = train_step(x, eps, weights[step], divisor)
            local_images += len(x)
            sums += batch_sums
            bad = (first_bad_step < 0) & ~torch.isfinite(batch_sums[0])
            first_bad_step = torch.where(bad, step + 1, first_bad_step)
            if not bar.disable and step % 50 == 0:
                bar.set_postfix(loss=f"{sums[0].item() / ((step + 1) * cfg.batch_size):.2f}")
        if world.size > 1:
            distributed.all_reduce(sums, world)
            # The earliest bad step of any rank (none: a step number past the end).
            first_bad_step = torch.where(first_bad_step < 0, n_batches + 1, first_bad_step)
            distributed.all_reduce(first_bad_step, world, op="min")
            first_bad_step = torch.where(first_bad_step > n_batches, -1, first_bad_step)
        images = distributed.all_reduce(torch.tensor(local_images, device=device), world)
        loss_sum, recon_sum, kl_sum = (sums / n_images).tolist()  # one host sync per epoch
        seconds = time.perf_counter() - started
        test = {}
        if world.is_main:  # rank 0 evaluates, logs and reports
            # The test-set ELBO uses its own seeded noise: evaluating never shifts training's RNG.
            noise = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
            test = dataset_elbo(model, test_images, params.loss.likelihood, noise)
        # A step's loss is computed before its update, so an update that breaks the model shows
        # in no loss of the epoch when it was the last (or only) step: the test ELBO catches it.
        # Rank 0's verdict reaches every rank, so all stop together.
        test_finite = torch.tensor(int(math.isfinite(test.get("neg_elbo", 0.0))), device=device)
        test_finite = int(distributed.all_reduce(test_finite, world, op="min"))
        if (bad_step := int(first_bad_step)) > 0 or not math.isfinite(loss_sum) or not test_finite:
            what = (f"the training loss became NaN or infinite at epoch {epoch}, step {bad_step} "
                    f"of {n_batches}" if bad_step > 0 else
                    f"the test ELBO became NaN or infinite after epoch {epoch}")  # fmt: skip
            raise VaelabError(
                f"{what}: training diverged. "
                + (
                    f"The checkpoint of epoch {epoch - 1} is kept. "
                    if epoch > 1 and world.size == 1
                    else ""
                )  # fmt: skip
                + f"Lower train.lr (now {cfg.lr}) and run again."
            )
        if not world.is_main:
            continue
        row = {
            "epoch": epoch,
            "train/loss": loss_sum,
            "train/neg_elbo": recon_sum + kl_sum,
            "train/recon": recon_sum,
            "train/kl": kl_sum,
            "test/neg_elbo": test["neg_elbo"],
            "test/recon": test["recon"],
            "test/kl": test["kl"],
            "epoch_seconds": seconds,
            "images_per_second": n_images / seconds,
            "train/images": int(images),
        }
        history.append(row)
        on_state(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "rng_cpu": torch.get_rng_state(),
                "rng_order": order.get_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
        )
        print(
            f"epoch {epoch:3d}/{cfg.epochs}  train -ELBO {row['train/neg_elbo']:9.3f}  "
            f"test -ELBO {row['test/neg_elbo']:9.3f}  ({seconds:.1f} s, "
            f"{row['images_per_second']:,.0f} img/s)",
            flush=True,
        )
        on_epoch(row)
    should_stop.close()
    return model, history


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


CHECKPOINT_VERSION = 1
# The params sections the train stage reads: a checkpoint resumes only when these are unchanged.
TRAIN_SECTIONS = ("data", "model", "loss", "train", "mlflow")


def training_config(params: Params, device: torch.device) -> dict[str, str]:
    """What a checkpoint must match to be resumed from: the params train reads, the training
    code (a fixed loss must not continue old weights), torch and the device type (RNG states
    differ between CPU and CUDA)."""
    from vaelab import model as model_module

    flat = params_mod.flatten(params)
    config = {k: str(v) for k, v in flat.items() if k.split(".")[0] in TRAIN_SECTIONS}
    for module in (__file__, model_module.__file__):
        config[f"code.{Path(module).name}"] = md5_of(Path(module))
    return config | {"torch": str(torch.__version__), "device": device.type}


def save_checkpoint(path: Path, state: dict, config: dict, data_md5: dict, run_id: str) -> None:
    """Write the end-of-epoch state atomically (temp file + fsync + rename): a crash, kill -9 or
    full disk while writing leaves the previous checkpoint intact."""
    payload = state | {"version": CHECKPOINT_VERSION, "config": config, "data_md5": data_md5,
                       "run_id": run_id}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, config: dict, data_md5: dict) -> tuple[dict | None, str]:
    """(state, "") to resume from; (None, why) to start fresh. A file that is not a checkpoint is
    refused (``weights_only=True`` never runs code from it) and left alone for the user."""
    if not path.exists():
        return None, ""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"version {checkpoint.get('version')!r}, expected {CHECKPOINT_VERSION}"
            )
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise VaelabError(
            f"{path}: not a usable vaelab checkpoint ({type(error).__name__}: {reason[:200]}). "
            "It was not loaded. Delete it to train from scratch."
        ) from None
    if checkpoint["config"] != config:
        changed = [
            f"{k}: {checkpoint['config'].get(k)} -> {config.get(k)}"
            for k in sorted(set(config) | set(checkpoint["config"]))
            if checkpoint["config"].get(k) != config.get(k)
        ]
        return None, f"the params changed since {path} was written ({'; '.join(changed)})"
    if checkpoint["data_md5"] != data_md5:
        return None, f"the data changed since {path} was written"
    return checkpoint, ""


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--run-info", type=Path, required=True)
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="end-of-epoch state, for resuming"
    )
    args = parser.parse_args(argv)
    params = params_mod.load(args.params)
    world = distributed.from_env()
    if params.train.nproc > 1 and world.size == 1:
        launch_ddp(params.train.nproc, sys.argv[1:] if argv is None else list(argv))
        return
    # Ctrl-C and SIGTERM only raise a flag that the loop reads between two steps: an exception
    # raised at an arbitrary point could land inside MLflow's or SQLite's code and be swallowed
    # there. A second signal stops at once.
    stop = StopFlag()
    with stop.installed():
        train_stage(args, params, world, stop)


def train_stage(
    args: argparse.Namespace, params: Params, world: distributed.World, stop: StopFlag
) -> None:
    """Load the data, join the DDP group if there is one, train (rank 0 also records)."""
    device = resolve_device(params.train.device)
    train_images, _ = load_split(args.data_dir, train=True)
    test_images, _ = load_split(args.data_dir, train=False)
    check_batch_size(params.train.batch_size, len(train_images))  # before touching the store
    if world.size > 1:
        if params.train.batch_size % world.size:  # torchrun started by hand: nproc not used
            raise VaelabError(
                f"'train.batch_size' is {params.train.batch_size}, which does not divide among "
                f"the {world.size} processes (WORLD_SIZE); it is the global batch. Choose a "
                "multiple of the number of processes."
            )
        device = distributed.start(world, device.type)
    try:
        if world.is_main:
            train_and_record(args, params, device, train_images, test_images, stop, world)
        else:  # the other DDP ranks train; rank 0 writes and logs
            train_model(params, train_images, test_images, device,
                        stop_requested=stop.is_set, world=world)  # fmt: skip
    finally:
        distributed.stop(world)  # nothing to do in a single process


def launch_ddp(nproc: int, argv: list[str]) -> None:
    """Run this command again as ``nproc`` DDP processes under torchrun; signals are passed on."""
    command = distributed.launch_command(nproc, argv)
    print(f"train: {nproc} processes: {' '.join(command[1:])}", flush=True)
    # Its own session: a terminal's Ctrl-C reaches torchrun once, through the forward below.
    launcher = subprocess.Popen(command, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        launcher.send_signal(signum)  # torchrun passes it on to every rank

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
    if forwarded:  # the ranks agreed on the stop (StopAgreement): rank 0 marked the run KILLED
        raise VaelabError(
            f"interrupted ({signal.Signals(forwarded[0]).name}); the MLflow run is marked KILLED. "
            "Distributed runs do not resume: `dvc repro` starts training again."
        )
    if code != 0:
        raise VaelabError(f"the {nproc} training processes failed (torchrun exit code {code}); "
                          "their messages are above.")  # fmt: skip


def train_and_record(
    args: argparse.Namespace,
    params: Params,
    device: torch.device,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    stop: StopFlag,
    world: distributed.World,
) -> None:
    """Rank 0's part (the only part without DDP): train with checkpoints (single process only),
    log to MLflow, write the model, history and run info."""
    checksums = json.loads((args.data_dir / CHECKSUMS_FILE).read_text())
    print(f"train: {len(train_images)} images on {device}, {params.train.epochs} epochs"
          + (f", {world.size} DDP processes" if world.size > 1 else ""))  # fmt: skip

    config = training_config(params, device)
    data_md5 = {name: entry["md5"] for name, entry in checksums["files"].items()}
    # Checkpoints hold one process's RNG states, so DDP runs neither write nor resume them.
    checkpoints = world.size == 1
    resume, why_fresh = load_checkpoint(args.checkpoint, config, data_md5) if checkpoints else (
        None, "")  # fmt: skip
    if resume:
        print(f"train: resuming after epoch {resume['epoch']} from {args.checkpoint}")
    elif why_fresh:
        print(f"train: starting fresh: {why_fresh}")
    history: list[dict[str, float]] = list(resume["history"]) if resume else []
    resume_run = resume["run_id"] if resume else None
    try:
        with tracking.training_run(
            params, checksums, device, args.params, resume_run, history, world.size
        ) as run:

            def on_state(state: dict) -> None:
                if checkpoints:
                    save_checkpoint(args.checkpoint, state, config, data_md5, run.run_id)

            def on_epoch(row: dict[str, float]) -> None:
                history.append(row)
                write_history(args.history, history)
                run.log_epoch(row)

            model, _ = train_model(params, train_images, test_images, device, on_epoch, resume,
                                   on_state, stop.is_set, world)  # fmt: skip
            write_history(args.history, history)  # also when a resume had no epoch left to run
            save(model, args.model)
            info = {"run_id": run.run_id, "experiment": params.mlflow.experiment}
            atomic_write_bytes(args.run_info, (json.dumps(info, indent=2) + "\n").encode())
    except KeyboardInterrupt:
        how = ("again to resume from the last complete epoch" if checkpoints
               else "again to train from the start (distributed runs do not resume)")  # fmt: skip
        raise VaelabError(
            f"interrupted after epoch {len(history)}; the MLflow run is marked KILLED. Run "
            f"`dvc repro` (or this command) {how}."
        ) from None
    args.checkpoint.unlink(missing_ok=True)  # finished: the model and history hold everything
    print(f"train: model -> {args.model}, MLflow run {run.run_id}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """A signal handler that records the request; the default action returns for a second one."""

    def __init__(self) -> None:
        self.signal: int | None = None

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
        self.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def is_set(self) -> bool:
        return self.signal is not None


if __name__ == "__main__":
    run_stage(main)
