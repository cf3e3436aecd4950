"""The ``record`` stage's side of MLflow: make sure one complete, FINISHED run holds a pipeline
result.

``record`` fingerprints params + train run id + history + metrics (+ DVC experiment name). If a
run already carries that fingerprint it does nothing. Else it completes the train run (metrics,
figures, artifacts, the MLflow model, FINISHED) when that run is unfinished and has exactly these
params; otherwise (train was cached by DVC, or only an evaluate/plot param changed) it creates a
new run rebuilt from the DVC outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vaelab.params import Params, flatten
from vaelab.tracking.models import log_model
from vaelab.tracking.run import (
    EARLIER_TAG,
    KEPT_TAG,
    STOP_TAG,
    TrainingRun,
    create_run,
    metric_batch,
)
from vaelab.tracking.store import connect
from vaelab.tracking.tags import TRAINING_TAGS, context_tags

FINGERPRINT_TAG = "vaelab.fingerprint"
RECORD_STANDARD = 3
SOURCE_RUN_TAG = "vaelab.source_run_id"


def _fingerprint(
    flat_params: dict[str, str], train_run_id: str, outputs: PipelineOutputs, history: list
) -> str:
    """What makes a pipeline result: params, the train run, and every output a run carries."""
    from vaelab.files import md5_of

    figures = sorted(p for p in outputs.figures.iterdir() if p.is_file())
    files = (outputs.metrics, outputs.checksums, outputs.model, *figures)
    payload = {
        # What a complete run holds changed: 2 = with its MLflow model, datasets and count tags;
        # 3 = with the validation split's dataset input and the stop tags.
        # A run recorded to an older standard matches no more, so record rebuilds it.
        "standard": RECORD_STANDARD,
        "params": flat_params,
        "train_run_id": train_run_id,
        "history": history,
        "files": {p.name: md5_of(p) for p in files},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# Numbers in metrics.json that are counts, not measurements: the run carries them as tags
# (``eval.images.train`` ...), so that every MLflow metric is something measured.
COUNTS = (
    "eval/epochs",
    "eval/model_epoch",
    "eval/images/train",
    "eval/images/val",
    "eval/images/test",
    "eval/latent/dims",
    "eval/val_iw/samples",
    "eval/test_iw/samples",
)


def count_tags(metrics: dict) -> dict[str, str]:
    """metrics.json's counts as tags: {"eval.images.train": "60000", ...}."""
    flat = flatten_metrics(metrics, counts=True)
    return {key.replace("/", "."): str(int(flat[key])) for key in COUNTS if key in flat}


def flatten_metrics(
    metrics: dict, prefix: str = "eval/", counts: bool = False
) -> dict[str, float]:
    """{"test": {"neg_elbo": 1.0}} -> {"eval/test/neg_elbo": 1.0} (numbers only; the ``COUNTS``
    only with ``counts``)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= flatten_metrics(value, f"{prefix}{key}/", counts)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    if not counts:
        flat = {key: value for key, value in flat.items() if key not in COUNTS}
    return flat


@dataclass(frozen=True)
class PipelineOutputs:
    params_file: Path
    run_info: Path
    checksums: Path
    history: Path
    metrics: Path
    figures: Path
    model: Path


def record(params: Params, outputs: PipelineOutputs, history: list[dict]) -> str:
    """Make sure one complete, FINISHED run holds this pipeline result; return its id."""
    from mlflow.entities import RunTag

    flat = {k: str(v) for k, v in flatten(params).items()}
    run_info = json.loads(outputs.run_info.read_text())  # TrainingRun.info
    train_run_id = run_info["run_id"]
    fingerprint = _fingerprint(flat, train_run_id, outputs, history)
    exp_name = os.environ.get("DVC_EXP_NAME") or None

    client, experiment_id = connect(params.mlflow.experiment)
    # The fingerprint is set last, so only a run that got everything can match. A DVC experiment
    # (even one restored whole from DVC's run cache) gets a run under its own name.
    query = f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and attributes.status = 'FINISHED'"
    if exp_name:
        query += f" and tags.`dvc.exp_name` = '{exp_name}'"
    done = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if done:
        print(f"record: run {done[0].info.run_id} already holds this result; nothing to log")
        return done[0].info.run_id

    try:
        source = client.get_run(train_run_id)
    except Exception:  # deleted or from another store: rebuild below
        source = None
    unfinished = source is not None and source.info.status == "RUNNING"
    if unfinished and source.info.experiment_id == experiment_id and source.data.params == flat:
        run_id = train_run_id
        if exp_name and source.info.run_name != exp_name:
            client.set_tag(run_id, "mlflow.runName", exp_name)
        how = "completed the train run"
    else:
        run_id = _rebuild(
            client,
            experiment_id,
            params=params,
            flat_params=flat,
            outputs=outputs,
            history=history,
            source=source,
            run_info=run_info,
        )
        how = f"rebuilt from DVC outputs (train run {train_run_id})"
    _upload(client, run_id, outputs, history)
    client.log_batch(run_id, tags=[RunTag(FINGERPRINT_TAG, fingerprint)])  # last: see above
    client.set_terminated(run_id, "FINISHED")
    print(f"record: MLflow run {run_id} is complete ({how})")
    return run_id


def _rebuild(
    client,
    experiment_id: str,
    *,
    params: Params,
    flat_params: dict[str, str],
    outputs: PipelineOutputs,
    history: list[dict],
    source,
    run_info: dict,
) -> str:
    """A new run with every param and epoch, rebuilt from the DVC outputs: train did not run this
    time (DVC cache), or its run holds other params (only an evaluate/plot param changed;
    MLflow params are immutable). An unfinished train run is marked superseded."""
    from mlflow.entities import Param

    # Where training ran: from the run info the train stage wrote beside the model, by the
    # attempt that finished training (it travels with a pulled DVC experiment), else from the
    # train run (run info written before it held tags). A train run's tags can be an earlier
    # attempt's: one resumed elsewhere before its tags followed (vaelab.tracking.run).
    train_run_id = run_info["run_id"]
    kept = (*TRAINING_TAGS, EARLIER_TAG, STOP_TAG, KEPT_TAG)
    from_run = source.data.tags if source is not None else {}
    carried = {k: v for k, v in from_run.items() if k in kept}
    carried |= {k: v for k, v in run_info.get("tags", {}).items() if k in kept}
    checksums = json.loads(outputs.checksums.read_text())
    tags = context_tags(checksums, params, outputs.params_file, "src/vaelab/record.py") | carried
    tags[SOURCE_RUN_TAG] = train_run_id
    run_id = create_run(client, experiment_id, params, checksums, tags)
    client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params.items()])
    rebuilt = TrainingRun(client, run_id)
    for row in history:
        rebuilt.log_epoch(row)
    if source is not None and source.info.status == "RUNNING":
        # Its results now live in the rebuilt run; don't leave it looking in progress.
        client.set_tag(train_run_id, "vaelab.superseded_by", run_id)
        client.set_terminated(train_run_id, "KILLED")
    return run_id


def _upload(client, run_id: str, outputs: PipelineOutputs, history: list[dict]) -> None:
    """The figures, reports, the weights file, the MLflow model, and the evaluation metrics
    (step = last epoch), which are also the model's."""
    from mlflow.entities import RunTag

    client.log_artifacts(run_id, str(outputs.figures), artifact_path="figures")
    for path in (outputs.params_file, outputs.metrics, outputs.history, outputs.checksums):
        client.log_artifact(run_id, str(path), artifact_path="reports")
    client.log_artifact(run_id, str(outputs.model), artifact_path="model")
    model_id = log_model(client, run_id, outputs.model)
    evaluation = json.loads(outputs.metrics.read_text())
    final_step = int(history[-1]["epoch"]) if history else 0
    tags = [RunTag(k, v) for k, v in count_tags(evaluation).items()]
    metrics = metric_batch(flatten_metrics(evaluation), final_step, model_id)
    client.log_batch(run_id, metrics=metrics, tags=tags)
