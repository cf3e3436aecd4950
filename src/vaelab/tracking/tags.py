"""What ties a run to its code, data and DVC experiment: the tags and dataset inputs of a training
run, where it trained, and the sweep it belongs to (its parent run). The train stage and
``record`` both set them."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
from pathlib import Path

import yaml

from vaelab.params import Params, config_id, flatten, flatten_yaml, load_yaml
from vaelab.tracking.source import git

KIND_TAG = "vaelab.kind"  # "sweep" / "comparison" on the runs that are not training runs
# A run of the pipeline that ``vaelab.reproduce`` re-creates carries the original's id, from the
# environment variable REPRODUCES_ENV it sets.
REPRODUCES_TAG = "vaelab.reproduces"
# Equal for runs whose params differ only in seeds and bookkeeping (vaelab.params.config_id): the
# MLflow UI's Group by this tag shows one row per configuration.
CONFIG_TAG = "vaelab.config"
REPRODUCES_ENV = "VAELAB_REPRODUCES"


def changed_params(params: Params, params_file: Path, baseline: str) -> str | None:
    """``"key=value, ..."`` for the params that differ from ``params_file`` as committed in
    ``baseline`` (what this experiment changed); None when git cannot tell."""
    top = git("rev-parse", "--show-toplevel")
    if top is None:
        return None
    try:
        relative = params_file.resolve().relative_to(Path(top).resolve()).as_posix()
    except ValueError:  # not inside this repository
        return None
    committed = git("show", f"{baseline}:{relative}")
    if committed is None:
        return None
    try:
        # Compared as plain YAML, so a baseline written for older code still reads.
        raw = load_yaml(committed) or {}
    except yaml.YAMLError:
        return None
    before = flatten_yaml(raw) if isinstance(raw, dict) else {}
    now = flatten(params)  # tuples as lists, as YAML reads them
    return ", ".join(f"{key}={value}" for key, value in now.items() if before.get(key) != value)


def context_tags(
    checksums: dict, params: Params, params_file: Path, source: str = "src/vaelab/train.py"
) -> dict[str, str]:
    """Tags tying a run to its code, data and DVC experiment; ``sweep`` (``mlflow.sweep``)
    groups the runs of one sweep. The ``mlflow.source.*`` tags and ``mlflow.user`` are MLflow's
    own for a script run (the UI's Source and User columns); ``source`` is the stage's module."""
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    changed = changed_params(params, params_file, baseline or "HEAD")
    tags = {
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": source,
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
        "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": baseline,
        # The params that differ from the baseline commit's (from HEAD's outside experiments).
        "params.changed": "unknown" if changed is None else changed,
        "sweep": params.mlflow.sweep,
        "data.source": str(checksums.get("source", "")),
    }
    for name, entry in checksums.get("files", {}).items():
        tags[f"data.md5.{name}"] = entry["md5"]
    tags[CONFIG_TAG] = config_id({key: str(value) for key, value in flatten(params).items()})
    if os.environ.get(REPRODUCES_ENV):
        tags[REPRODUCES_TAG] = os.environ[REPRODUCES_ENV]
    return tags


def dataset_inputs(checksums: dict, binarize: str, validation: int = 0):
    """The data sets as MLflow dataset inputs (-> list[mlflow DatasetInput]), with the contexts
    ``training``, ``validation`` (the training file's last ``validation`` images; none when 0)
    and ``test``: named after the data source, the rows of the file they are and the
    binarisation, with a digest of the verified files' MD5s and the rows (the same bytes and
    split, the same digest) and the image count as profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from vaelab.data import TEST_FILES, TRAIN_FILES

    files = checksums.get("files", {})
    source = checksums.get("source", "data")

    def images(names: tuple[str, ...]) -> int:
        return (files.get(names[0], {}).get("bytes", 16) - 16) // 784  # IDX: 16-byte header

    n_train = images(TRAIN_FILES)
    cut = max(n_train - validation, 0)
    # (name, context, files, first row, end row); the held-out sets of a binarised run are one
    # fixed, seeded binary sample each (vaelab.data).
    splits = [("train", "training", TRAIN_FILES, 0, cut, f" ({binarize} binarisation)")]
    fixed = " (binarised, fixed seed)"
    if validation:
        splits.append(("validation", "validation", TRAIN_FILES, cut, n_train, fixed))
    splits.append(("test", "test", TEST_FILES, 0, images(TEST_FILES), fixed))
    inputs = []
    for split, context, names, first, end, suffix in splits:
        md5s = "".join(f"{name}:{files.get(name, {}).get('md5', '')}\n" for name in names)
        rows = f"[{first}:{end}]" if validation and names == TRAIN_FILES else ""
        dataset = Dataset(
            name=f"{source} {split}{rows}" + (suffix if binarize != "none" else ""),
            digest=hashlib.sha256(f"{md5s}{rows}".encode()).hexdigest()[:16],
            source_type="local",
            source=json.dumps({"files": list(names), "rows": [first, end]}),
            profile=json.dumps({"num_rows": end - first}),
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    return inputs


# Where training ran: what may change float results between two runs of the same code, params
# and data (vaelab.reproduce names the ones that differ).
TRAINING_TAGS = (
    "device",
    "torch.version",
    "torch.threads",
    "world_size",
    "python.version",
    "platform",
)


def training_tags(device: object, world_size: int) -> dict[str, str]:
    """Where training ran (``TRAINING_TAGS``): the device, torch's version and its threads
    (intra-op; under DDP each rank's), the DDP processes (1 for one), Python, the platform."""
    import torch

    return {
        "device": str(device),
        "torch.version": torch.__version__,
        "torch.threads": str(torch.get_num_threads()),
        "world_size": str(world_size),
        "python.version": platform.python_version(),
        "platform": platform.platform(),
    }


def parent_tag(client, experiment_id: str, label: str) -> dict[str, str]:
    """``mlflow.parentRunId`` of a run of sweep ``label``, when the sweep has a parent run."""
    parent = sweep_parent(client, experiment_id, label)
    return {"mlflow.parentRunId": parent} if parent else {}


def sweep_parent(client, experiment_id: str, label: str) -> str | None:
    """The id of sweep ``label``'s parent run, if one was started."""
    if not label:
        return None
    query = f"tags.`{KIND_TAG}` = 'sweep' and tags.sweep = '{label}'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else None
