"""End-of-epoch training checkpoints (``models/train_checkpoint.pt``): what one must match to be
resumed from, and writing and reading them. Rank 0 writes them (the only rank of a single
process); under DDP every rank reads them to resume (``vaelab.train.resume_from``)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from vaelab import params as params_mod
from vaelab.errors import VaelabError
from vaelab.files import atomic_write_bytes, md5_of
from vaelab.imports import module_files, reached_modules
from vaelab.params import Params

VERSION = 1
# The params sections the train stage reads: a checkpoint resumes only when these are unchanged,
# but for the keys below.
TRAIN_SECTIONS = ("data", "model", "loss", "train", "mlflow")
# How many processes share the global batch (the maths is the same: a run checkpointed by 2
# processes resumes on 1 after losing a node) and how often torchrun restarts them.
NOT_FINGERPRINTED = ("train.nproc", "train.max_restarts")
TRAIN_STAGE = "vaelab.train"


def training_config(params: Params, device: torch.device) -> dict[str, str]:
    """What a checkpoint must match to be resumed from: the params train reads, the code of every
    module the train stage runs (a fixed loss must not continue old weights), torch and the device
    type (RNG states differ between CPU and CUDA)."""
    flat = params_mod.flatten(params)
    config = {
        k: str(v)
        for k, v in flat.items()
        if k.split(".")[0] in TRAIN_SECTIONS and k not in NOT_FINGERPRINTED
    }
    for module in reached_modules(TRAIN_STAGE):
        for path in module_files(module):  # a package's data files are its code too
            key = f"code.{module}" if path.suffix == ".py" else f"code.{module}/{path.name}"
            config[key] = md5_of(path)
    return config | {"torch": str(torch.__version__), "device": device.type}


def save(path: Path, state: dict, *, config: dict, data_md5: dict, run_id: str) -> None:
    """Write the end-of-epoch ``state`` (``TrainingState.snapshot()``) atomically: a crash,
    kill -9 or full disk while writing leaves the previous checkpoint intact."""
    payload = state | {
        "version": VERSION,
        "config": config,
        "data_md5": data_md5,
        "run_id": run_id,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path, *, config: dict, data_md5: dict) -> tuple[dict | None, str]:
    """(checkpoint, "") to resume from; (None, why) to start fresh. A file that is not a
    checkpoint is refused (``weights_only=True`` never runs code from it) and left alone for the
    user."""
    if not path.exists():
        return None, ""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("version") != VERSION:
            raise ValueError(f"version {checkpoint.get('version')!r}, expected {VERSION}")
    except Exception as error:  # any unreadable file gets the same advice
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise VaelabError(
            f"{path}: not a usable vaelab checkpoint ({type(error).__name__}: {reason[:200]}). "
            "It was not loaded. Delete it to train from scratch."
        ) from None
    if checkpoint["config"] != config:
        return None, _what_changed(checkpoint["config"], config, path)
    if checkpoint["data_md5"] != data_md5:
        return None, f"the data changed since {path} was written"
    return checkpoint, ""


def _what_changed(old: dict[str, str], new: dict[str, str], path: Path) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    code = [k.removeprefix("code.") for k in keys if k.startswith("code.")]
    other = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if not k.startswith("code.")]
    reasons = []
    if other:
        reasons.append(f"the params changed since {path} was written ({'; '.join(other)})")
    if code:
        reasons.append(f"the code of {', '.join(code)} changed since {path} was written")
    return "; ".join(reasons)


@dataclass(frozen=True)
class CheckpointFile:
    """The train stage's checkpoint file with what it must match: ``save`` and ``load`` bound to
    this run's config and data."""

    path: Path
    config: dict[str, str]
    data_md5: dict[str, str]

    @classmethod
    def of(
        cls, path: Path, *, params: Params, device: torch.device, checksums: dict
    ) -> CheckpointFile:
        data_md5 = {name: entry["md5"] for name, entry in checksums["files"].items()}
        return cls(path, training_config(params, device), data_md5)

    def save(self, snapshot: dict, run_id: str) -> None:
        save(self.path, snapshot, config=self.config, data_md5=self.data_md5, run_id=run_id)

    def load(self) -> tuple[dict | None, str]:
        return load(self.path, config=self.config, data_md5=self.data_md5)
