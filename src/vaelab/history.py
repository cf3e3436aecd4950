"""The per-epoch training history (``reports/train_history.csv``): its columns, which are also
the MLflow metric keys of every epoch (step = epoch), and its CSV form."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from vaelab.files import atomic_write_bytes

COLUMNS = (
    "epoch",
    "epoch/train/loss",
    "epoch/train/lr",
    "epoch/train/neg_elbo",
    "epoch/train/recon",
    "epoch/train/kl",
    "epoch/test/neg_elbo",
    "epoch/test/recon",
    "epoch/test/kl",
    "epoch_seconds",
    "images_per_second",
    "epoch/train/images",
)


# The columns MLflow gets as per-epoch metrics: measurements. ``epoch/train/images`` (images
# trained on in the epoch, all ranks together) is a count: the run carries it as a tag.
# The ``epoch/`` prefix sorts the curves' chart groups first in the MLflow UI (docs/tracking.md).
METRICS = tuple(c for c in COLUMNS if c not in ("epoch", "epoch/train/images"))
COUNT_TAGS = {"epoch/train/images": "train.images_per_epoch"}


def write(path: Path, history: list[dict[str, float]]) -> None:
    """One row per epoch, ``COLUMNS`` in order, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


def read(path: Path) -> list[dict[str, float]]:
    """The rows ``write`` wrote: ``epoch`` as int, every other column as float."""
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
