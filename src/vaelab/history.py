"""The per-epoch training history (``reports/train_history.csv``): its columns, which are also
the MLflow metric keys of every epoch (step = epoch), and its CSV form."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from vaelab.files import atomic_write_bytes

TRAIN_COLUMNS = (
    "epoch",
    "epoch/train/loss",
    "epoch/train/lr",
    "epoch/train/neg_elbo",
    "epoch/train/recon",
    "epoch/train/kl",
)
TIMING_COLUMNS = ("epoch_seconds", "images_per_second", "epoch/train/images")
# With a validation split (data.validation > 0): the best epoch so far (lowest validation
# -ELBO) and the epochs since it, which early stopping (train.patience) reads.
BEST_COLUMNS = ("train.best_epoch", "train.epochs_since_best")


def heldout_columns(split: str) -> tuple[str, ...]:
    """The per-epoch held-out pass's columns: ``split`` is "val" with a validation split, else
    "test" (data.validation: 0)."""
    return tuple(f"epoch/{split}/{term}" for term in ("neg_elbo", "recon", "kl"))


def columns(split: str) -> tuple[str, ...]:
    """A history's columns, in order, for the held-out ``split`` ("val" or "test")."""
    best = BEST_COLUMNS if split == "val" else ()
    return TRAIN_COLUMNS + heldout_columns(split) + TIMING_COLUMNS + best


COLUMNS = columns("test")  # without a validation split (data.validation: 0)


# The columns MLflow gets as per-epoch metrics: measurements, of either layout. ``epoch`` is the
# step; ``epoch/train/images`` (images trained on in the epoch, all ranks together) is a count:
# the run carries it as a tag. The ``epoch/`` prefix sorts the curves' chart groups first in the
# MLflow UI (docs/tracking.md).
def metrics(split: str) -> tuple[str, ...]:
    """The MLflow metrics of a history with the held-out ``split`` ("val" or "test")."""
    return tuple(c for c in columns(split) if c not in ("epoch", "epoch/train/images"))


METRICS = tuple(dict.fromkeys(metrics("test") + metrics("val")))  # of either layout
COUNT_TAGS = {"epoch/train/images": "train.images_per_epoch"}


def heldout_split(history: list[dict[str, float]]) -> str:
    """Which split a history's held-out columns are: "val" or "test"."""
    return "val" if history and "epoch/val/neg_elbo" in history[0] else "test"


def write(path: Path, history: list[dict[str, float]]) -> None:
    """One row per epoch, ``columns(split)`` in order, written atomically."""
    buffer = io.StringIO()
    fieldnames = columns(heldout_split(history))
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


def read(path: Path) -> list[dict[str, float]]:
    """The rows ``write`` wrote: ``epoch`` and the best epoch as int, the others as float."""
    whole = ("epoch", "train.best_epoch", "train.epochs_since_best")
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k in whole else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
