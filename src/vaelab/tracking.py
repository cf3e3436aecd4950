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
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from vaelab.errors import VaelabError
from vaelab.params import Params, flatten, flatten_yaml, load_yaml

FINGERPRINT_TAG = "vaelab.fingerprint"
SOURCE_RUN_TAG = "vaelab.source_run_id"
DEFAULT_STORE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def _quiet_mlflow() -> None:
    # SQLAlchemy deprecation chatter from MLflow's store is noise to users.
    warnings.filterwarnings("ignore", message=".*SADeprecationWarning.*")
    warnings.filterwarnings("ignore", module="sqlalchemy")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="mlflow")
    # vaelab.serving's model has an explicit signature; MLflow's type-hint inference is unused.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
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


def context_tags(checksums: dict, params: Params, params_file: Path) -> dict[str, str]:
    """Tags tying a run to its code, data and DVC experiment; ``sweep`` (``mlflow.sweep``)
    groups the runs of one sweep."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    changed = changed_params(params, params_file, baseline or "HEAD")
    tags = {
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
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


def _metric_batch(values: dict[str, float], step: int, model_id: str | None = None):
    """MLflow metrics at ``step``; with ``model_id`` they are also the logged model's."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()]


@dataclass
class TrainingRun:
    client: object
    run_id: str

    def log_epoch(self, row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        values = {k: v for k, v in row.items() if k != "epoch"}
        self.client.log_batch(self.run_id, metrics=_metric_batch(values, epoch))


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
    import torch
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
        tags = context_tags(checksums, params, params_file) | {
            "device": str(device),
            "torch.version": torch.__version__,
            "world_size": str(world_size),  # DDP processes (1: a single process)
        }
        run_name = os.environ.get("DVC_EXP_NAME") or None
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        if resumed is None:
            flat = flatten(params)
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat.items()])
        logged = {m.step for m in client.get_metric_history(run_id, "train/loss")}
        run = TrainingRun(client, run_id)
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
        "params": flat_params,
        "train_run_id": train_run_id,
        "history": history,
        "files": {p.name: md5_of(p) for p in files},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def flatten_metrics(metrics: dict, prefix: str = "eval/") -> dict[str, float]:
    """{"test": {"neg_elbo": 1.0}} -> {"eval/test/neg_elbo": 1.0} (numbers only)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= flatten_metrics(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
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
    train_run_id = json.loads(outputs.run_info.read_text())["run_id"]
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
            outputs=outputs,
            history=history,
            source=source,
            train_run_id=train_run_id,
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
    outputs: PipelineOutputs,
    history: list[dict],
    source,
    train_run_id: str,
) -> str:
    """A new run with every param and epoch, rebuilt from the DVC outputs: train did not run this
    time (DVC cache), or its run holds other params (only an evaluate/plot param changed;
    MLflow params are immutable). An unfinished train run is marked superseded."""
    from mlflow.entities import Param

    carried = {}
    if source is not None:
        carried = {
            k: source.data.tags[k]
            for k in ("device", "torch.version", "world_size")
            if k in source.data.tags
        }
    checksums = json.loads(outputs.checksums.read_text())
    tags = context_tags(checksums, params, outputs.params_file) | carried
    tags[SOURCE_RUN_TAG] = train_run_id
    exp_name = os.environ.get("DVC_EXP_NAME") or None
    run_id = client.create_run(experiment_id, run_name=exp_name, tags=tags).info.run_id
    flat = {k: str(v) for k, v in flatten(params).items()}
    client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])
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
    client.log_artifacts(run_id, str(outputs.figures), artifact_path="figures")
    for path in (outputs.params_file, outputs.metrics, outputs.history, outputs.checksums):
        client.log_artifact(run_id, str(path), artifact_path="reports")
    client.log_artifact(run_id, str(outputs.model), artifact_path="model")
    model_id = log_model(client, run_id, outputs.model)
    metrics = flatten_metrics(json.loads(outputs.metrics.read_text()))
    final_step = int(history[-1]["epoch"]) if history else 0
    client.log_batch(run_id, metrics=_metric_batch(metrics, final_step, model_id))


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
    if f"tags.{KIND_TAG}" in runs.columns:
        runs = runs[runs[f"tags.{KIND_TAG}"].fillna("") != "comparison"]
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


def log_comparison(experiment: str, files: list[Path], compared: list[str]) -> str:
    """A FINISHED run named "comparison" with ``files`` under ``comparison/``; returns its id."""
    client, experiment_id = connect(experiment)
    tags = {
        KIND_TAG: "comparison",
        "vaelab.compared_runs": ",".join(compared)[:5000],
        "mlflow.note.content": f"{len(compared)} runs compared by python -m vaelab.compare.",
    }
    run_id = client.create_run(experiment_id, run_name="comparison", tags=tags).info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="comparison")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def ui_main(argv: list[str] | None = None) -> None:
    """``make ui``: serve the project's store with ``mlflow ui`` on 127.0.0.1."""
    import argparse

    parser = argparse.ArgumentParser(description="MLflow UI on the project's tracking store")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
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


if __name__ == "__main__":
    ui_main()
