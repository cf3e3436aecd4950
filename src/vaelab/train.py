"""Stage ``train``: fit the VAE, log every epoch to MLflow, write the model and the history.

    python -m vaelab.train --params params.yaml --data-dir data/MNIST --model models/vae.pt \
        --history reports/train_history.csv --run-info models/mlflow_run.json \
        --checkpoint models/train_checkpoint.pt

The loop itself is ``vaelab.training.train_model``; this module adds what the stage owns: the
files, the MLflow run, checkpoints and resuming, Ctrl-C, and the DDP relaunch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vaelab import checkpoints, distributed, history
from vaelab import device as device_mod
from vaelab import params as params_mod
from vaelab.data import CHECKSUMS_FILE, load_split
from vaelab.errors import VaelabError, run_stage
from vaelab.files import atomic_write_bytes
from vaelab.model import VAE, save
from vaelab.params import Params
from vaelab.tracking.run import training_run
from vaelab.training import check_batch_size, train_model


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
        distributed.launch(params.train.nproc, sys.argv[1:] if argv is None else list(argv))
        return
    # Ctrl-C / SIGTERM: stop between two steps.
    stop = distributed.StopFlag(repeat_stops_at_once=world.size == 1)
    with stop.installed():
        train_stage(args, params, world=world, stop=stop)


def train_stage(
    args: argparse.Namespace,
    params: Params,
    *,
    world: distributed.World,
    stop: distributed.StopFlag,
) -> None:
    """Load the data, join the DDP group if there is one, train (rank 0 also records)."""
    device = device_mod.resolve(params.train.device)
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
            images = (train_images, test_images)
            train_and_record(args, params, device=device, images=images, stop=stop, world=world)
        else:  # the other DDP ranks train; rank 0 writes and logs
            train_model(
                params,
                train_images,
                test_images,
                device=device,
                stop_requested=stop.is_set,
                world=world,
            )
    finally:
        distributed.stop(world)  # nothing to do in a single process


def train_and_record(
    args: argparse.Namespace,
    params: Params,
    *,
    device: torch.device,
    images: tuple[torch.Tensor, torch.Tensor],
    stop: distributed.StopFlag,
    world: distributed.World,
) -> None:
    """Rank 0's part (the only part without DDP): train with checkpoints (single process only),
    log to MLflow, write the model, history and run info. ``images``: (train, test)."""
    checksums = json.loads((args.data_dir / CHECKSUMS_FILE).read_text())
    ddp = f", {world.size} DDP processes" if world.size > 1 else ""
    print(f"train: {len(images[0])} images on {device}, {params.train.epochs} epochs{ddp}")
    # Checkpoints hold one process's RNG states, so DDP runs neither write nor resume them.
    checkpoint = None
    if world.size == 1:
        checkpoint = checkpoints.CheckpointFile.of(
            args.checkpoint, params=params, device=device, checksums=checksums
        )
    resume = resume_from(checkpoint)
    rows: list[dict[str, float]] = list(resume["history"]) if resume else []
    run_id = resume["run_id"] if resume else None
    try:
        with training_run(
            params,
            checksums,
            device=device,
            params_file=args.params,
            resume_run_id=run_id,
            history=rows,
            world_size=world.size,
        ) as run:

            def on_state(snapshot: dict) -> None:
                if checkpoint:
                    checkpoint.save(snapshot, run.run_id)

            def on_epoch(row: dict[str, float]) -> None:
                rows.append(row)
                history.write(args.history, rows)
                run.log_epoch(row)

            model, _ = train_model(
                params,
                *images,
                device=device,
                on_epoch=on_epoch,
                on_state=on_state,
                resume=resume,
                stop_requested=stop.is_set,
                world=world,
            )
            write_outputs(args, model, rows, run.info(params.mlflow.experiment))
    except KeyboardInterrupt:
        raise interrupted(len(rows), resumable=checkpoint is not None) from None
    args.checkpoint.unlink(missing_ok=True)  # finished: the model and history hold everything
    print(f"train: model -> {args.model}, MLflow run {run.run_id}")


def interrupted(epochs_done: int, *, resumable: bool) -> VaelabError:
    """The message of a Ctrl-C or SIGTERM that stopped training."""
    how = "resume from the last complete epoch"
    if not resumable:
        how = "train from the start (distributed runs do not resume)"
    return VaelabError(
        f"interrupted after epoch {epochs_done}; the MLflow run is marked KILLED. Run "
        f"`dvc repro` (or this command) again to {how}."
    )


def write_outputs(args: argparse.Namespace, model: VAE, rows: list[dict], info: dict) -> None:
    """The stage's outputs: the history (also when a resume had no epoch left to run), the model
    and the run info that ``record`` reads (``TrainingRun.info``)."""
    history.write(args.history, rows)
    save(model, args.model)
    atomic_write_bytes(args.run_info, (json.dumps(info, indent=2) + "\n").encode())


def resume_from(checkpoint: checkpoints.CheckpointFile | None) -> dict | None:
    """The checkpoint to resume from, if it matches this run; says which way it goes."""
    if checkpoint is None:
        return None
    resume, why_fresh = checkpoint.load()
    if resume:
        print(f"train: resuming after epoch {resume['epoch']} from {checkpoint.path}")
    elif why_fresh:
        print(f"train: starting fresh: {why_fresh}")
    return resume


if __name__ == "__main__":
    run_stage(main)
