"""The train stage's MLflow run: opened with every param and tag, one log call per epoch,
FAILED or KILLED with the reason when training stops, continued after a resume.

It stays RUNNING when training succeeds: ``vaelab.tracking.record`` completes it after evaluate
and plot (docs/tracking.md).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vaelab.history import COUNT_TAGS as HISTORY_COUNT_TAGS
from vaelab.history import METRICS as HISTORY_METRICS
from vaelab.params import Params, flatten
from vaelab.tracking.source import UNKNOWN, log_uncommitted, uncommitted
from vaelab.tracking.store import connect
from vaelab.tracking.tags import (
    TRAINING_TAGS,
    context_tags,
    dataset_inputs,
    parent_tag,
    training_tags,
)

# A run resumed elsewhere (another train.nproc, device, thread count or machine) carries the
# environment tags (TRAINING_TAGS) of where it finished, and in this tag what differed where the
# earlier epochs ran: "until epoch 1: world_size=2; until epoch 3: device=cuda:0".
EARLIER_TAG = "vaelab.earlier_environment"

STOP_TAG = "vaelab.stopped"  # why training ended
KEPT_TAG = "vaelab.kept"  # last | best: which epoch's weights are the model (train.keep)


def metric_batch(values: dict[str, float], step: int, model_id: str | None = None):
    """MLflow metrics at ``step``; with ``model_id`` they are also the logged model's."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()]


@dataclass
class TrainingRun:
    client: object
    run_id: str
    # Where training ran (training_tags, where it finished; EARLIER_TAG after a resume elsewhere)
    tags: dict[str, str] = field(default_factory=dict)

    def info(self, experiment: str) -> dict:
        """What the train stage writes to ``models/mlflow_run.json`` for ``record``: the run and
        where training ran (a clone that pulls the experiment cannot reach this run)."""
        return {"run_id": self.run_id, "experiment": experiment, "tags": self.tags}

    def log_epoch(self, row: dict[str, float]) -> None:
        """The row's measurements as metrics at step = epoch; its counts as tags."""
        from mlflow.entities import RunTag

        epoch = int(row["epoch"])
        values = {k: v for k, v in row.items() if k in HISTORY_METRICS}
        tags = [RunTag(tag, str(int(row[k]))) for k, tag in HISTORY_COUNT_TAGS.items() if k in row]
        self.client.log_batch(self.run_id, metrics=metric_batch(values, epoch), tags=tags)

    def log_stop(self, reason: str, keep: str) -> None:
        """Why training ended (``STOP_TAG``: train.epochs reached, or early stopping with the
        best epoch) and which epoch's weights the model holds (``train.keep``)."""
        from mlflow.entities import RunTag

        stop = {STOP_TAG: reason, KEPT_TAG: keep}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in stop.items()])
        self.tags |= stop  # the run info carries them to a run record rebuilds


def _resumable(client, run_id: str | None, experiment_id: str):
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # deleted, or another store: start a new run
        return None
    usable = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
    return run if usable else None


def _finishing_here(client, run, environment: dict[str, str], epochs: int) -> dict[str, str]:
    """Tag resumed ``run`` with this attempt's ``environment`` (training_tags), which trains its
    epochs after ``epochs``; what differed before goes to ``EARLIER_TAG``. Returns the tags.

    Why where it finished: the tags are what `vaelab.reproduce` names and compares, and a
    reproduction trains in one go with the run's final params (train.nproc included), on this
    attempt's kind of environment; the first attempt's tags would name the wrong one."""
    from mlflow.entities import RunTag

    before = run.data.tags
    moved = [k for k in TRAINING_TAGS if k in before and before[k] != environment.get(k)]
    earlier = before.get(EARLIER_TAG, "")
    if moved:
        entry = f"until epoch {epochs}: " + ", ".join(f"{k}={before[k]}" for k in moved)
        earlier = f"{earlier}; {entry}" if earlier else entry
    tags = environment | ({EARLIER_TAG: earlier[:5000]} if earlier else {})
    client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return tags


def create_run(client, experiment_id: str, params: Params, checksums: dict, tags: dict) -> str:
    """A new run of this pipeline result, named after the DVC experiment when there is one, with
    ``tags``, its sweep's parent, the code's uncommitted changes (tag, and the diff as an
    artifact) and the data sets as inputs; returns its id."""
    code = uncommitted()
    tags = tags | parent_tag(client, experiment_id, params.mlflow.sweep)
    tags |= code.tags() if code else UNKNOWN
    run_name = os.environ.get("DVC_EXP_NAME") or None
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    log_datasets(
        client, run_id, dataset_inputs(checksums, params.data.binarize, params.data.validation)
    )
    log_uncommitted(client, run_id, code)
    return run_id


def log_datasets(client, run_id: str, datasets: list) -> None:
    """Log the run's data sets, once more when another run created the same data set at that
    moment: MLflow's server looks a data set up, then inserts it, and on PostgreSQL two runs
    starting together (a shared search's trials) both inserted it, one failing with
    ``duplicate key value violates unique constraint "dataset_pk"`` (seen here); the second try
    finds it."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=datasets)
    except MlflowException as error:
        if "dataset_pk" not in str(error):
            raise
        client.log_inputs(run_id, datasets=datasets)


@contextlib.contextmanager
def training_run(
    params: Params,
    checksums: dict,
    *,
    device: object,
    params_file: Path,
    resume_run_id: str | None = None,
    history: list[dict] = (),
    world_size: int = 1,
    restarts: int = 0,
) -> Iterator[TrainingRun]:
    """Open the train stage's run with all params and tags; mark it FAILED on an exception
    (KILLED on Ctrl-C), with the reason as the ``vaelab.error`` tag. ``restarts``: how often
    torchrun restarted the processes (the tag ``vaelab.restarts`` when > 0).

    With ``resume_run_id`` (training resumed from a checkpoint) the same run continues: it is
    set RUNNING again, the epochs of ``history`` it lacks are logged, so no step is missing or
    doubled, and its environment tags become this attempt's (``EARLIER_TAG`` keeps what differed
    before). On success it stays RUNNING: ``record`` finishes it after evaluate and plot.
    """
    from mlflow.entities import Param

    client, experiment_id = connect(params.mlflow.experiment)
    resumed = _resumable(client, resume_run_id, experiment_id)
    environment = training_tags(device, world_size)
    if resumed is not None:
        run_id = resumed.info.run_id
        client.update_run(run_id, status="RUNNING")
        if "vaelab.error" in resumed.data.tags:
            client.delete_tag(run_id, "vaelab.error")
        client.set_tag(run_id, "vaelab.resumed_after_epoch", str(len(history)))
        if restarts:
            client.set_tag(run_id, "vaelab.restarts", str(restarts))
        environment = _finishing_here(client, resumed, environment, len(history))
    else:  # also a group torchrun restarted before the first checkpoint: a new run, so tag it
        tags = context_tags(checksums, params, params_file) | environment
        tags |= {"vaelab.restarts": str(restarts)} if restarts else {}
        run_id = create_run(client, experiment_id, params, checksums, tags)
    try:
        if resumed is None:
            flat = flatten(params)
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat.items()])
        logged = {m.step for m in client.get_metric_history(run_id, HISTORY_METRICS[0])}
        run = TrainingRun(client, run_id, environment)
        for row in history:
            if int(row["epoch"]) not in logged:
                run.log_epoch(row)
        yield run
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        client.set_tag(run_id, "vaelab.error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, status)
        raise
