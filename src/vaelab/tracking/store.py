"""Where the MLflow store is and how to open it: ``connect`` is the one entry every other module
of ``vaelab.tracking`` goes through.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<root>/mlflow.db`` with artifacts
in ``<root>/mlartifacts/<experiment>``, where <root> is the parent repository (``DVC_ROOT``), so
queued experiments that run in temporary copies log to the same store.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from pathlib import Path

from vaelab.errors import VaelabError

DEFAULT_STORE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def quiet_mlflow() -> None:
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


def sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def check_reachable(uri: str) -> None:
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
    quiet_mlflow()
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_reachable(uri)
    db = sqlite_path(uri)
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
