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
from vaelab.data import CHECKSUMS_FILE, training_data
from vaelab.errors import VaelabError, run_stage
from vaelab.files import atomic_write_bytes
from vaelab.model import VAE, save
from vaelab.params import Params
from vaelab.tracking.run import training_run
from vaelab.training import check_batch_size, stop_reason, train_model


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
        argv = sys.argv[1:] if argv is None else list(argv)
        distributed.launch(params.train.nproc, argv, params.train.max_restarts)
        return
    # Under torchrun: a restarted group after a divergence or Ctrl-C stops once joined.
    final = distributed.FinalStop(
        args.checkpoint.with_name(f"{args.checkpoint.name}.stopped"), world
    )
    # Ctrl-C / SIGTERM: stop between two steps.
    stop = distributed.StopFlag(repeat_stops_at_once=world.size == 1)
    with stop.installed(), final.recorded():
        train_stage(args, params, world=world, stop=stop, final=final)


def train_stage(
    args: argparse.Namespace,
    params: Params,
    *,
    world: distributed.World,
    stop: distributed.StopFlag,
    final: distributed.FinalStop,
) -> None:
    """Load the data, join the DDP group if there is one, stop there if it is a group torchrun
    restarted after a final failure, agree on the checkpoint to resume from, train (rank 0 also
    writes checkpoints and records).

    The held-out images: the validation split (the training file's last ``data.validation``
    images, never trained on); the test set only without one (``data.validation: 0``), so that
    with a validation split nothing this stage does can look at the test images."""
    device = device_mod.resolve(params.train.device)
    validation = params.data.validation
    train_images, heldout_images = training_data(args.data_dir, validation)
    # before touching the store
    check_batch_size(params.train.batch_size, len(train_images), validation)
    if world.size > 1:
        device = join_group(world, params.train.batch_size, device)
    try:
        restarts = final.check()  # the count of every machine's torchrun, once joined
        checksums = json.loads((args.data_dir / CHECKSUMS_FILE).read_text())
        checkpoint = checkpoints.CheckpointFile.of(
            args.checkpoint, params=params, device=device, checksums=checksums
        )
        resume = resume_from(checkpoint, world)
        if world.is_main:
            images = (train_images, heldout_images)
            train_and_record(
                args,
                params,
                device=device,
                images=images,
                stop=stop,
                world=world,
                checkpoint=checkpoint,
                resume=resume,
                checksums=checksums,
                restarts=restarts,
            )
        else:  # the other DDP ranks train; rank 0 writes and logs
            train_model(
                params,
                train_images,
                heldout_images,
                device=device,
                resume=resume,
                stop_requested=stop.is_set,
                world=world,
            )
    finally:
        distributed.stop(world)  # nothing to do in a single process


def join_group(world: distributed.World, batch_size: int, device: torch.device) -> torch.device:
    """Join the DDP group (its ranks' device); the global batch must divide among the ranks."""
    if batch_size % world.size:  # torchrun started by hand: train.nproc not used
        raise VaelabError(
            f"'train.batch_size' is {batch_size}, which does not divide among the {world.size} "
            "processes (WORLD_SIZE); it is the global batch. Choose a multiple of the number of "
            "processes."
        )
    device = distributed.start(world, device.type)
    warning = distributed.unrestartable_warning()
    if warning and world.is_main:
        print(warning, file=sys.stderr, flush=True)
    return device


def train_and_record(
    args: argparse.Namespace,
    params: Params,
    *,
    device: torch.device,
    images: tuple[torch.Tensor, torch.Tensor],
    stop: distributed.StopFlag,
    world: distributed.World,
    checkpoint: checkpoints.CheckpointFile,
    resume: dict | None,
    checksums: dict,
    restarts: int,
) -> None:
    """Rank 0's part (the only part without DDP): train from ``resume`` (or from scratch),
    write a checkpoint after every epoch, log to MLflow, write the model, history and run info.
    ``images``: (train, held out: validation, else test); ``restarts``: torchrun's restarts of
    the processes (``distributed.group_restart_count``)."""
    ddp = f", {world.size} DDP processes" if world.size > 1 else ""
    held = params.data.validation
    split = f" ({held} held out for validation)" if held else " (no validation split)"
    print(f"train: {len(images[0])} images{split} on {device}, {params.train.epochs} epochs{ddp}")
    rows: list[dict[str, float]] = list(resume["history"]) if resume else []
    try:
        with training_run(
            params,
            checksums,
            device=device,
            params_file=args.params,
            resume_run_id=resume["run_id"] if resume else None,
            history=rows,
            world_size=world.size,
            restarts=restarts,
        ) as run:

            def on_epoch(row: dict[str, float]) -> None:
                rows.append(row)
                history.write(args.history, rows)
                run.log_epoch(row)

            model, _ = train_model(
                params,
                *images,
                device=device,
                on_epoch=on_epoch,
                on_state=lambda snapshot: checkpoint.save(snapshot, run.run_id),
                resume=resume,
                stop_requested=stop.is_set,
                world=world,
            )
            reason = stop_reason(rows, params)
            run.log_stop(reason, params.train.keep)
            print(f"train: {reason}")
            write_outputs(args, model, rows, run.info(params.mlflow.experiment))
    except KeyboardInterrupt:
        raise VaelabError(
            f"interrupted after epoch {len(rows)}; the MLflow run is marked KILLED. Run "
            "`dvc repro` (or this command) again to resume from the last complete epoch."
        ) from None
    args.checkpoint.unlink(missing_ok=True)  # finished: the model and history hold everything
    print(f"train: model -> {args.model}, MLflow run {run.run_id}")


def write_outputs(args: argparse.Namespace, model: VAE, rows: list[dict], info: dict) -> None:
    """The stage's outputs: the history (also when a resume had no epoch left to run), the model
    and the run info that ``record`` reads (``TrainingRun.info``)."""
    history.write(args.history, rows)
    save(model, args.model)
    atomic_write_bytes(args.run_info, (json.dumps(info, indent=2) + "\n").encode())


def _verdict(checkpoint: checkpoints.CheckpointFile) -> tuple[dict | None, tuple]:
    """This rank's reading of the checkpoint: (what to resume from, or None; a verdict to
    compare with the other ranks': ("resume", epoch, run id), ("fresh", why) or ("refused",
    message))."""
    try:
        resume, why_fresh = checkpoint.load()
    except VaelabError as error:
        return None, ("refused", str(error))
    if resume is None:
        return None, ("fresh", why_fresh)
    return resume, ("resume", resume["epoch"], resume["run_id"])


def _said(verdict: tuple, elsewhere: str | None = None) -> str:
    """What a rank made of the checkpoint; ``elsewhere``: the path it read, when not rank 0's
    (each machine given a local path of its own)."""
    where = f" (it reads {elsewhere})" if elsewhere else ""
    if verdict[0] == "resume":
        return f"resumes after epoch {verdict[1]} of MLflow run {verdict[2]}{where}"
    if verdict[0] == "refused":
        return f"refuses it{where}: {verdict[1]}"
    if verdict[1]:
        return f"starts fresh ({verdict[1]}){where}"
    return f"finds no checkpoint at {elsewhere}" if elsewhere else "finds no checkpoint there"


def resume_from(checkpoint: checkpoints.CheckpointFile, world: distributed.World) -> dict | None:
    """The checkpoint to resume from, if it matches this run; says which way it goes (rank 0).

    Under DDP every rank reads it (each resumes its own state from it) and all must read the
    same: when a rank cannot read the checkpoint rank 0 resumes from (several machines without
    shared storage) or judges it otherwise (other code or params), every rank stops here, before
    anything is trained or overwritten."""
    resume, verdict = _verdict(checkpoint)
    readings = distributed.gather((verdict, str(checkpoint.path)), world)
    verdicts = [v for v, _ in readings]
    paths = [path for _, path in readings]
    first = verdicts[0]
    if first[0] == "refused":  # an unusable file: the usual refusal, on every rank
        raise VaelabError(first[1])
    all_fresh = all(v[0] == "fresh" for v in verdicts)  # whatever each found: none resumes
    if any(v != first for v in verdicts) and not all_fresh:
        differing = "; ".join(
            f"rank {rank} {_said(v, paths[rank] if paths[rank] != paths[0] else None)}"
            for rank, v in enumerate(verdicts)
            if v != first
        )
        raise VaelabError(
            f"the {world.size} processes do not agree on the checkpoint {paths[0]}: rank "
            f"0 {_said(first)}; {differing}. Every process must see the same checkpoint (on "
            "storage every node reads, see docs/scale.md) and run the same code and params. "
            "Nothing was trained or overwritten."
        )
    if world.is_main and resume:
        print(f"train: resuming after epoch {resume['epoch']} from {checkpoint.path}")
    elif world.is_main and first[1]:
        print(f"train: starting fresh: {first[1]}")
    return resume


if __name__ == "__main__":
    run_stage(main)
