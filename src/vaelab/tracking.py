"""Everything MLflow: where the store is, the run lifecycle, tags, and what each run holds.

Design (see docs/tracking.md):
- ``train`` opens a run, logs all params and tags, and logs every epoch live (step = epoch).
  It leaves the run RUNNING: the pipeline is not done yet.
- ``record`` (the last stage, ``always_changed``) fingerprints params + train run id + history +
  metrics (+ DVC experiment name). If a run already carries that fingerprint it does nothing.
  Else it completes the train run (metrics, figures, artifacts, FINISHED) when that run is
  unfinished and has exactly these params; otherwise (train was cached by DVC, or only an
  evaluate/plot param changed) it creates a new run rebuilt from the DVC outputs.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<root>/mlflow.db`` with artifacts
in ``<root>/mlartifacts/<experiment>``, where <root> is the parent repository (``DVC_ROOT``), so
queued experiments that run in temporary copies log to the same store.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vaelab.errors import VaelabError
from vaelab.history import COUNT_TAGS as HISTORY_COUNT_TAGS
from vaelab.history import METRICS as HISTORY_METRICS
from vaelab.params import Params, flatten, flatten_yaml, load_yaml

FINGERPRINT_TAG = "vaelab.fingerprint"
RECORD_STANDARD = 2
SOURCE_RUN_TAG = "vaelab.source_run_id"
DEFAULT_STORE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def _quiet_mlflow() -> None:
    # SQLAlchemy deprecation chatter from MLflow's store is noise to users.
    warnings.filterwarnings("ignore", message=".*SADeprecationWarning.*")
    warnings.filterwarnings("ignore", module="sqlalchemy")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="mlflow")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def project_root() -> Path:
    """The repository whose store runs belong to: DVC_ROOT inside DVC (the parent repository,
    also for queued experiments in temp copies), else the nearest folder with a ``.dvc``."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DEFAULT_STORE}"


def _sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def _check_reachable(uri: str) -> None:
    """Fail in seconds, before any training, when a tracking server does not answer (MLflow's
    own client retries for minutes). Never fall back to another store silently."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as error:
        raise VaelabError(
            f"cannot reach the MLflow tracking server {uri} ({error}). Start it, fix "
            "MLFLOW_TRACKING_URI, or unset it to use the project's own mlflow.db."
        ) from None


def _create_experiment(client, experiment: str, location: str | None) -> str:
    """Create the experiment; if another process created it since we looked (queued experiments
    starting at once against a tracking server, which the SQLite file lock does not cover), use
    that one. ``location`` None leaves the artifact root to the store (a server's proxied
    ``mlflow-artifacts:/``)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(experiment, artifact_location=location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        found = client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage != "active":
            raise
        return found.experiment_id


def connect(experiment: str):  # returns (MlflowClient, experiment id)
    """Open the store and get or create the experiment, under a file lock for SQLite stores:
    a brand-new SQLite store created by two processes at once breaks for good."""
    _quiet_mlflow()
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    _check_reachable(uri)
    db = _sqlite_path(uri)
    lock = FileLock(f"{db}.lock", timeout=300) if db else contextlib.nullcontext()
    try:
        with lock:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                location = None
                if uri == f"sqlite:///{project_root() / DEFAULT_STORE}":
                    # Fix the artifact root at the repository root: an experiment created inside a
                    # queued run would otherwise keep artifacts in its temp copy, deleted later.
                    location = (project_root() / DEFAULT_ARTIFACTS / experiment).as_uri()
                experiment_id = _create_experiment(client, experiment, location)
            elif found.lifecycle_stage != "active":
                raise VaelabError(
                    f"MLflow experiment '{experiment}' is deleted in {uri}. Restore it in the UI, "
                    "or set mlflow.experiment in params.yaml to another name."
                )
            else:
                experiment_id = found.experiment_id
    except VaelabError:
        raise
    except Exception as error:  # any store failure is reported the same way
        raise VaelabError(
            f"cannot use the MLflow tracking store {uri}: {type(error).__name__}: {error}. "
            "Check MLFLOW_TRACKING_URI (unset it to use the project's mlflow.db)."
        ) from None
    return client, experiment_id


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def changed_params(params: Params, params_file: Path, baseline: str) -> str | None:
    """``"key=value, ..."`` for the params that differ from ``params_file`` as committed in
    ``baseline`` (what this experiment changed); None when git cannot tell."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None:
        return None
    try:
        relative = params_file.resolve().relative_to(Path(top).resolve()).as_posix()
    except ValueError:  # not inside this repository
        return None
    committed = _git("show", f"{baseline}:{relative}")
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
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
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
    return tags


def dataset_inputs(checksums: dict, binarize: str):  # -> list[mlflow DatasetInput]
    """The training and test sets as MLflow dataset inputs (contexts ``training`` and
    ``evaluation``): named after the data source and the binarisation, with a digest of the
    verified files' MD5s (the same bytes, the same digest) and the image count as profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from vaelab.data import TEST_FILES, TRAIN_FILES

    files = checksums.get("files", {})
    # The test set of a binarised run is one fixed, seeded binary sample (vaelab.data).
    suffixes = {"train": f" ({binarize} binarisation)", "test": " (binarised, fixed seed)"}
    inputs = []
    for split, context, names in (
        ("train", "training", TRAIN_FILES),
        ("test", "evaluation", TEST_FILES),
    ):
        md5s = "".join(f"{name}:{files.get(name, {}).get('md5', '')}\n" for name in names)
        count = (files.get(names[0], {}).get("bytes", 16) - 16) // 784  # IDX: 16-byte header
        dataset = Dataset(
            name=f"{checksums.get('source', 'data')} {split}"
            + (suffixes[split] if binarize != "none" else ""),
            digest=hashlib.sha256(md5s.encode()).hexdigest()[:16],
            source_type="local",
            source=json.dumps({"files": list(names)}),
            profile=json.dumps({"num_rows": count}),
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    return inputs


def _metric_batch(values: dict[str, float], step: int, model_id: str | None = None):
    """MLflow metrics at ``step``; with ``model_id`` they are also the logged model's."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()]


@dataclass
class TrainingRun:
    client: object
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)  # where training ran (training_tags)

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
        self.client.log_batch(self.run_id, metrics=_metric_batch(values, epoch), tags=tags)


TRAINING_TAGS = ("device", "torch.version", "world_size")


def training_tags(device: object, world_size: int) -> dict[str, str]:
    """Where training ran (``TRAINING_TAGS``); ``world_size``: DDP processes, 1 for one."""
    import torch

    return {
        "device": str(device),
        "torch.version": torch.__version__,
        "world_size": str(world_size),
    }


def _resumable(client, run_id: str | None, experiment_id: str):
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # deleted, or another store: start a new run
        return None
    usable = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
    return run if usable else None


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
) -> Iterator[TrainingRun]:
    """Open the train stage's run with all params and tags; mark it FAILED on an exception
    (KILLED on Ctrl-C), with the reason as the ``vaelab.error`` tag.

    With ``resume_run_id`` (training resumed from a checkpoint) the same run continues: it is
    set RUNNING again and the epochs of ``history`` it lacks are logged, so no step is missing
    or doubled. On success it stays RUNNING: ``record`` finishes it after evaluate and plot.
    """
    from mlflow.entities import Param

    client, experiment_id = connect(params.mlflow.experiment)
    resumed = _resumable(client, resume_run_id, experiment_id)
    if resumed is not None:
        run_id = resumed.info.run_id
        client.update_run(run_id, status="RUNNING")
        if "vaelab.error" in resumed.data.tags:
            client.delete_tag(run_id, "vaelab.error")
        client.set_tag(run_id, "vaelab.resumed_after_epoch", str(len(history)))
    else:
        tags = context_tags(checksums, params, params_file) | training_tags(device, world_size)
        tags |= _parent_tag(client, experiment_id, params.mlflow.sweep)
        run_name = os.environ.get("DVC_EXP_NAME") or None
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        client.log_inputs(run_id, datasets=dataset_inputs(checksums, params.data.binarize))
    try:
        if resumed is None:
            flat = flatten(params)
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat.items()])
        logged = {m.step for m in client.get_metric_history(run_id, HISTORY_METRICS[0])}
        run = TrainingRun(client, run_id, training_tags(device, world_size))
        for row in history:
            if int(row["epoch"]) not in logged:
                run.log_epoch(row)
        yield run
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        client.set_tag(run_id, "vaelab.error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, status)
        raise


def _fingerprint(
    flat_params: dict[str, str], train_run_id: str, outputs: PipelineOutputs, history: list
) -> str:
    """What makes a pipeline result: params, the train run, and every output a run carries."""
    from vaelab.files import md5_of

    figures = sorted(p for p in outputs.figures.iterdir() if p.is_file())
    files = (outputs.metrics, outputs.checksums, outputs.model, *figures)
    payload = {
        # What a complete run holds changed: 2 = with its MLflow model, datasets and count tags.
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
    "eval/images/train",
    "eval/images/test",
    "eval/latent/dims",
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

    # Where training ran: from the train run, else (another store: a pulled DVC experiment)
    # from the run info the train stage wrote beside the model.
    train_run_id = run_info["run_id"]
    carried = {k: v for k, v in run_info.get("tags", {}).items() if k in TRAINING_TAGS}
    if source is not None:
        carried |= {k: source.data.tags[k] for k in TRAINING_TAGS if k in source.data.tags}
    checksums = json.loads(outputs.checksums.read_text())
    tags = context_tags(checksums, params, outputs.params_file, "src/vaelab/record.py") | carried
    tags[SOURCE_RUN_TAG] = train_run_id
    tags |= _parent_tag(client, experiment_id, params.mlflow.sweep)
    exp_name = os.environ.get("DVC_EXP_NAME") or None
    run_id = client.create_run(experiment_id, run_name=exp_name, tags=tags).info.run_id
    client.log_inputs(run_id, datasets=dataset_inputs(checksums, params.data.binarize))
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
    metrics = _metric_batch(flatten_metrics(evaluation), final_step, model_id)
    client.log_batch(run_id, metrics=metrics, tags=tags)


MODEL_TAG = "vaelab.model_uri"


def log_model(client, run_id: str, weights: Path) -> str:
    """Log ``weights`` as the run's MLflow model (``vaelab.serving``: a pyfunc from pixels to
    latent means, with signature and input example, carrying this package as its code so that
    it loads without vaelab installed); return its model id. The run stays RUNNING."""
    import mlflow

    from vaelab import serving
    from vaelab.model import load

    mlflow.set_tracking_uri(tracking_uri())
    latent_dims = load(weights).latent_dims
    # The fluent API logs into the active run; ending it would mark the run FINISHED before
    # record has set its fingerprint, so the status is put back.
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            # Not "model": the run's artifact folder model/ holds the weights file, and MLflow
            # would resolve runs:/<id>/model to both.
            name="vae",
            python_model=serving.LatentMeans(),
            artifacts={"weights": str(weights)},
            code_paths=[str(Path(serving.__file__).parent)],
            signature=serving.signature(latent_dims),
            input_example=serving.input_example(),
            pip_requirements=_requirements(),
        )
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, MODEL_TAG, info.model_uri)
    print(f"record: MLflow model {info.model_uri}")
    return info.model_id


def _requirements() -> list[str]:
    """What the model needs where it is loaded (vaelab itself travels as its code)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "numpy")]


KIND_TAG = "vaelab.kind"  # "comparison" on the runs vaelab.compare logs


def find_runs(experiment: str, filter_string: str = "", run_ids: list[str] = ()):
    """FINISHED training runs of ``experiment`` as ``mlflow.search_runs`` returns them: a pandas
    DataFrame, one row per run, columns ``params.*``, ``metrics.*`` (last values), ``tags.*``;
    oldest first. ``filter_string`` is MLflow's search syntax, e.g. ``tags.sweep = 'latent'``."""
    import mlflow

    _quiet_mlflow()
    uri = tracking_uri()
    _check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise VaelabError(f"no MLflow experiment '{experiment}' in {uri}; run the pipeline first.")
    query = ["attributes.status = 'FINISHED'"]
    if run_ids:
        query.append("attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")")
    if filter_string:
        query.append(filter_string)
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(
            experiment_ids=[found.experiment_id],
            filter_string=" and ".join(query),
            order_by=["attributes.start_time ASC"],
        )
    except mlflow.exceptions.MlflowException as error:
        raise VaelabError(
            f"MLflow cannot search with {filter_string!r}: {error.message}"
        ) from None
    if f"tags.{KIND_TAG}" in runs.columns:  # training runs only: no comparison, no sweep parent
        runs = runs[runs[f"tags.{KIND_TAG}"].fillna("") == ""]
    return runs.reset_index(drop=True)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of ``key``, by step."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=tracking_uri()).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def download_artifact(run_id: str, artifact_path: str, destination: Path) -> Path | None:
    """The run's artifact copied under ``destination``; None when the run does not have it."""
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=artifact_path,
            dst_path=str(destination),
            tracking_uri=tracking_uri(),
        )
    except Exception:  # missing artifact: the caller shows a gap instead
        return None
    return Path(local)


def log_comparison(
    experiment: str, files: list[Path], compared: list[str], parent: str | None = None
) -> str:
    """Log ``files`` under ``comparison/`` and finish the run: into the sweep's parent run when
    the compared runs are one sweep's children (``parent``), else into a new run named
    "comparison"; returns its id."""
    from mlflow.entities import RunTag

    client, experiment_id = connect(experiment)
    tags = {
        "vaelab.compared_runs": ",".join(compared)[:5000],
        "mlflow.note.content": f"{len(compared)} runs compared by python -m vaelab.compare.",
    }
    if parent is not None:
        run_id = parent
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        tags[KIND_TAG] = "comparison"
        run_id = client.create_run(experiment_id, run_name="comparison", tags=tags).info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="comparison")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def start_sweep(experiment: str, label: str, swept: dict[str, str]) -> str:
    """The parent run of sweep ``label`` (run name = label; params: the swept keys and values):
    every run whose ``mlflow.sweep`` is ``label`` becomes its child (``mlflow.parentRunId``), so
    the UI shows the sweep as one row; ``compare`` finishes it with the report. The existing
    parent of that label, if there is one."""
    from mlflow.entities import Param

    client, experiment_id = connect(experiment)
    found = sweep_parent(client, experiment_id, label)
    if found:
        return found
    tags = {
        KIND_TAG: "sweep",
        "sweep": label,
        "mlflow.note.content": f"Sweep over {', '.join(swept)}: its runs are the children.",
    }
    run_id = client.create_run(experiment_id, run_name=label, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(f"sweep.{k}", v) for k, v in swept.items()])
    return run_id


def fail_sweep(experiment: str, label: str, reason: str) -> bool:
    """End sweep ``label``'s parent run as FAILED with ``reason`` as its note (the comparison
    that would finish it could not be made); False when the sweep has no running parent."""
    client, experiment_id = connect(experiment)
    parent = sweep_parent(client, experiment_id, label)
    if parent is None or client.get_run(parent).info.status != "RUNNING":
        return False
    client.set_tag(parent, "mlflow.note.content", f"The sweep's comparison failed: {reason}")
    client.set_terminated(parent, "FAILED")
    return True


def _parent_tag(client, experiment_id: str, label: str) -> dict[str, str]:
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


def ui_link(base: str, uri: str, experiment: str) -> str:
    """The UI page of ``experiment``'s runs in MLflow's "Model training" view (the UI opens in
    its GenAI view otherwise; it reads ``workflowType`` from the address of the page)."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    found = None
    if _sqlite_path(uri) is None or _sqlite_path(uri).exists():  # never create a store here
        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    page = f"#/experiments/{found.experiment_id}/runs" if found else "#/experiments"
    return f"{base}/{page}?workflowType=machine_learning"


def ui_main(argv: list[str] | None = None) -> None:
    """``make ui``: serve the project's store with ``mlflow ui`` on 127.0.0.1."""
    import argparse

    parser = argparse.ArgumentParser(description="MLflow UI on the project's tracking store")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--experiment", default="vaelab", help="the page the link opens")
    args = parser.parse_args(argv)
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        # `mlflow ui` serves a store and fails on a server's http URI; a server has its own UI.
        print(
            f"MLFLOW_TRACKING_URI is the tracking server {uri}: open it in a browser for its "
            "runs. Serving this project's local store here.",
            flush=True,
        )
        uri = f"sqlite:///{project_root() / DEFAULT_STORE}"
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port}", flush=True)
    print(f"open: {ui_link(f'http://{args.host}:{args.port}', uri, args.experiment)}", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    os.execv(sys.executable, cmd)


# --- The model registry (python -m vaelab.register) ----------------------------------------------
# Built on find_runs and the model tag log_model sets; nothing above depends on it.

RANK_METRIC = "eval/test_iw/nll"  # nats per image, lower is better; vaelab.compare's default too


@dataclass(frozen=True)
class Registration:
    """Where ``alias`` of the registered model ``name`` points after ``register_best``."""

    name: str
    alias: str
    version: str
    run_id: str
    metric: str
    value: float
    new_version: bool  # a version was created for the run's model (else an existing one is used)
    previous: str | None  # the version the alias pointed at before; == version: nothing changed

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def best_run(runs, metric: str = RANK_METRIC, descending: bool = False):
    """The row of ``runs`` (``find_runs``' DataFrame, oldest first) with the lowest ``metric``,
    the highest with ``descending``; the oldest of equals, so the choice does not flip-flop.
    Runs without the metric are not ranked."""
    column = f"metrics.{metric}"
    ranked = runs[runs[column].notna()] if column in runs.columns else runs.iloc[:0]
    if ranked.empty:
        available = sorted(
            c.removeprefix("metrics.")
            for c in runs.columns
            if c.startswith("metrics.") and runs[c].notna().any()
        )
        raise VaelabError(
            f"no FINISHED run has the metric '{metric}'; choose --metric from: "
            f"{', '.join(available) or 'none'}."
        )
    return ranked.sort_values(column, ascending=not descending, kind="stable").iloc[0]


def _best_with_model(runs, metric: str, descending: bool):
    """``best_run``; among runs equal on the metric, one with a model: the same result recorded
    again with its model ties with the older run recorded before models were logged."""
    best = best_run(runs, metric, descending)
    tag = f"tags.{MODEL_TAG}"
    modelled = runs[runs[tag].fillna("").str.startswith("models:/")] if tag in runs else runs[:0]
    if not _has_model(best) and not modelled.empty:
        candidate = best_run(modelled, metric, descending)
        if candidate[f"metrics.{metric}"] == best[f"metrics.{metric}"]:
            return candidate
    return best


def _has_model(row) -> bool:
    model_uri = row.get(f"tags.{MODEL_TAG}")
    return isinstance(model_uri, str) and model_uri.startswith("models:/")


def register_best(
    experiment: str,
    *,
    metric: str = RANK_METRIC,
    descending: bool = False,
    filter_string: str = "",
    name: str = "vaelab-vae",
    alias: str = "champion",
) -> Registration:
    """Point ``alias`` of the registered model ``name`` at the MLflow model of the best FINISHED
    training run of ``experiment`` (``best_run``), registering that model as a new version unless
    a version of ``name`` already holds it: registering again without a better run creates
    nothing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    runs = find_runs(experiment, filter_string)
    if runs.empty:
        where = f" matching {filter_string!r}" if filter_string else ""
        raise VaelabError(
            f"no FINISHED training run in experiment '{experiment}'{where} to register; run "
            "`make repro` (or `dvc repro`) first, or change --filter."
        )
    best = _best_with_model(runs, metric, descending)
    run_id, value = str(best["run_id"]), float(best[f"metrics.{metric}"])
    model_uri = best.get(f"tags.{MODEL_TAG}")
    if not _has_model(best):
        raise VaelabError(
            f"the best run {run_id} ({metric} = {value:g}) has no logged MLflow model (no tag "
            f"{MODEL_TAG}): it was recorded before models were logged. Run `dvc repro` (or "
            "`dvc exp apply` its experiment, then `dvc repro`) to record it again with its model, "
            f"or leave such runs out with --filter \"tags.`{MODEL_TAG}` LIKE 'models:/%'\"."
        )
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # mlflow.register_model uses the fluent API's store
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        previous = _aliased_version(client, name, alias)
        if previous is not None and _holds(previous, model_uri):
            same = str(previous.version)
            return Registration(name, alias, same, run_id, metric, value, False, same)
        version = _version_holding(client, name, model_uri)
        new_version = version is None
        if new_version:
            version = mlflow.register_model(model_uri, name)
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as error:
        invalid = error.error_code == "INVALID_PARAMETER_VALUE"
        hint = " Choose another --name or --alias." if invalid else ""
        raise VaelabError(
            f"cannot register {model_uri} (run {run_id}) as '{name}' with alias '{alias}' in "
            f"{uri}: {error.message}{hint}"
        ) from None
    return Registration(
        name,
        alias,
        str(version.version),
        run_id,
        metric,
        value,
        new_version,
        None if previous is None else str(previous.version),
    )


def _aliased_version(client, name: str, alias: str):
    """The version ``alias`` points at; None when the registered model or the alias is new."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return None if version is None else client.get_model_version(name, str(version))


def _holds(version, model_uri: str) -> bool:
    """Whether the model version was registered from the logged model ``models:/<model id>``.
    MLflow 3.17's SQL registry leaves ``version.model_id`` None; ``source`` keeps the URI."""
    return version.source == model_uri or f"models:/{version.model_id}" == model_uri


def _version_holding(client, name: str, model_uri: str):
    """The newest version of ``name`` registered from the logged model ``model_uri``, or None
    (the alias may have been moved away from it by hand since)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    holding = [v for v in versions if _holds(v, model_uri)]
    return max(holding, key=lambda v: int(v.version), default=None)


if __name__ == "__main__":
    ui_main()
