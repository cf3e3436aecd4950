"""Reading runs back: the FINISHED training runs of an experiment as a pandas DataFrame, a metric's
history, an artifact. ``compare`` and the registry read through these."""

from __future__ import annotations

from pathlib import Path

from vaelab.errors import VaelabError
from vaelab.tracking.store import check_reachable, quiet_mlflow, tracking_uri
from vaelab.tracking.tags import KIND_TAG, REPRODUCES_TAG


def find_runs(experiment: str, filter_string: str = "", run_ids: list[str] = ()):
    """FINISHED training runs of ``experiment`` as ``mlflow.search_runs`` returns them: a pandas
    DataFrame, one row per run, columns ``params.*``, ``metrics.*`` (last values), ``tags.*``;
    oldest first. ``filter_string`` is MLflow's search syntax, e.g. ``tags.sweep = 'latent'``."""
    import mlflow

    quiet_mlflow()
    uri = tracking_uri()
    check_reachable(uri)
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
    # Training runs only: no comparison, no sweep parent, and no reproduction (vaelab.reproduce),
    # which would count its original twice.
    for tag in (KIND_TAG, REPRODUCES_TAG):
        if f"tags.{tag}" in runs.columns:
            runs = runs[runs[f"tags.{tag}"].fillna("") == ""]
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
